"""The public benchmarks in their official layouts: one module per family, a catalog of names (`catalog`),
the shared reading helpers (`base`) and the class-name tables (`classnames`)."""
