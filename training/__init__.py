"""Training TFS-Diff: the (DDP-ready) training loop and fine-tuning (`train`), and shrinking a bundle
member towards its baseline (`shrink`). Data sources, batches and augmentation live in
`tfsdeploy.data`; the optimiser step the loop takes is `tfsdeploy.diffusion.train_step`."""
