"""Models: the settings that travel with a checkpoint (`config`), the compact family (`compact`), checkpoint
save/load (`checkpoint`) and the one loader that turns any name into a model (`loader`)."""
