"""`digseg segment` as a library: expanding inputs, running the pipeline over them, writing the outputs and
the manifest."""
