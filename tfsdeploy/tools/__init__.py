"""Tools that sit above the library: the speed bench, the sampler study, the evaluation and the demo.
Each is handed a FusionPipeline (or the engines it times) and a dataset; only the CLI wires them up."""
