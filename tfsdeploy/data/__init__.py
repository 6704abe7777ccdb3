"""Data: where tri-modal triplets come from and how they become batches.

- `folder`: the one on-disk layout (ROOT/[split/]{t1,t2,func}[/gt]/NAME.png), matched by name;
- `spm`: the registered SPM templates that install with the package;
- `synth`: patient-like slices synthesised from the SPM label and tissue maps;
- `build`: `data build`, which writes the sources into that layout;
- `batches`: degradation, the upsample-then-fuse baseline and cropping, batched on a device;
- `augment`: joint augmentation of sources and targets.

Importing this package does not import nibabel or read `spm-runtime`; only the functions that
read the templates do.
"""

from tfsdeploy.data.augment import augment
from tfsdeploy.data.batches import Batch, make_batch, stack_samples
from tfsdeploy.data.folder import MODALITY_DIRS, SPLITS, FolderSource, Sample, open_split, standardise
from tfsdeploy.data.build import DEFAULT_SOURCES, SOURCES, build_dataset, default_data_dir, ensure_dataset
from tfsdeploy.data.spm import load_spm_volumes, reference_triplet

__all__ = ["augment", "Batch", "make_batch", "stack_samples", "MODALITY_DIRS", "SPLITS", "FolderSource", "Sample",
           "open_split", "standardise", "build_dataset", "SOURCES", "DEFAULT_SOURCES", "default_data_dir", "ensure_dataset", "load_spm_volumes",
           "reference_triplet"]
