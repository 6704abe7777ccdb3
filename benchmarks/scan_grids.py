"""What reading, resampling and registering scans from the scanner cost beside the fusion itself.

    python benchmarks/scan_grids.py                    # ~3 minutes on a 2-core CPU
    python benchmarks/scan_grids.py --slices 4 --no-register

The volumes, made from the SPM templates (tfsdeploy.data.spm) in a temporary folder:
  t1     1 mm, 256^3, written as a DICOM series of 256 files (pydicom);
  t2     the template's own 2 mm, 91x109x91 grid, NIfTI;
  spect  4 mm, 64^3, NIfTI, moved by a known rigid motion (rotation 4/-3/6 degrees, shift 5/-4/3 mm).

Timed, side by side in one process:
  outside the network: opening the scan as `fuse` does (tfsdeploy.scans.open_scan on the DICOM
    folder and the two NIfTI files: reading, the overlap check, resampling t2 and spect onto the t1
    grid, normalisation; its registration time is counted apart), the per-slice preparation inside
    fuse_scan, and writing the fused volume (.nii.gz);
  the network: the denoiser loop of a x4 fuse (FusionPipeline.__call__), on --slices slices of the
    256 and scaled to 256 (the loop's cost is the same for every slice);
  registration: open_scan's rigid registration of t2 and of spect to the t1 (--register).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nibabel as nib  # noqa: E402
from nibabel.processing import resample_from_to  # noqa: E402

from tests.test_dicom_grids import rigid, write_series  # noqa: E402  (one DICOM writer, the tests')
from tfsdeploy.data.spm import SPM_MEMBERS, SPM_PREFIX, spm_archive  # noqa: E402


def make_volumes(folder: Path) -> dict[str, Path]:
    with zipfile.ZipFile(spm_archive()) as z:
        spm = {k: nib.as_closest_canonical(nib.Nifti1Image.from_bytes(z.read(SPM_PREFIX + SPM_MEMBERS[k])))
               for k in ("t1", "t2", "spect")}
    center = np.array([0.0, -18.0, 18.0])  # about the middle of the MNI head

    def grid(n: int, mm: float) -> np.ndarray:
        a = np.diag([mm, mm, mm, 1.0])
        a[:3, 3] = center - mm * (n - 1) / 2
        return a

    t1 = resample_from_to(spm["t1"], ((256,) * 3, grid(256, 1.0)), order=1)
    write_series(nib.Nifti1Image(t1.get_fdata(dtype=np.float32), t1.affine), folder / "t1_dicom", "T1 1 mm")
    nib.save(spm["t2"], folder / "t2.nii.gz")
    spect = resample_from_to(spm["spect"], ((64,) * 3, grid(64, 4.0)), order=1)
    motion = rigid((4.0, -3.0, 6.0), (5.0, -4.0, 3.0), center)
    nib.save(nib.Nifti1Image(spect.get_fdata(dtype=np.float32), motion @ spect.affine), folder / "spect.nii.gz")
    return {"t1": folder / "t1_dicom", "t2": folder / "t2.nii.gz", "func": folder / "spect.nii.gz"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=8, help="slices actually fused (the network time is scaled to 256)")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--register", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    import torch

    from tfsdeploy.config import SampleConfig
    from tfsdeploy.pipeline import FusionPipeline
    from tfsdeploy.scans import open_scan

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        paths = make_volumes(tmp)
        print(f"made the volumes in {time.perf_counter() - t0:.1f} s (not counted)")
        times: dict[str, float] = {}

        def timed(name, fn, *a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            times[name] = time.perf_counter() - t
            return out

        lines: list[str] = []
        scan = timed("open_scan", open_scan, paths["t1"], paths["t2"], paths["func"], register=args.register,
                     log=lines.append)
        for line in lines:
            print("  " + line)
        regs = scan.registrations
        for m, reg in regs.items():
            times[f"register {m} to t1"] = reg.seconds
        times["open_scan: read, check, resample, normalise"] = times.pop("open_scan") - sum(
            r.seconds for r in regs.values())

        pipe = FusionPipeline.load(None, args.scale, SampleConfig())
        net = [0.0]
        call = FusionPipeline.__call__

        def timed_call(self, *a, **kw):
            t = time.perf_counter()
            out = call(self, *a, **kw)
            net[0] += time.perf_counter() - t
            return out

        FusionPipeline.__call__ = timed_call

        class Part:  # `args.slices` slices from the middle of the scan
            kind = scan.kind

            def __init__(self, first: int, n: int):
                self.first, self.n = first, n

            def __len__(self):
                return self.n

            def slice(self, i):
                return scan.slice(self.first + i)

        n = len(scan)
        t = time.perf_counter()
        fused = pipe.fuse_scan(Part(n // 2 - args.slices // 2, args.slices), batch_size=4)
        loop = time.perf_counter() - t
        per_slice_net, per_slice_other = net[0] / args.slices, (loop - net[0]) / args.slices
        full = np.repeat(fused[:1], n, axis=0)  # the whole scan's output, to time its writing
        timed("write fused .nii.gz", scan.write_output, tmp / "fused.nii.gz", full)
        times["slice preparation in fuse_scan (scaled)"] = per_slice_other * n

        outside = sum(v for k, v in times.items() if not k.startswith("register"))
        network = per_slice_net * n
        print(f"\n{pipe.describe()}, x{args.scale}, {torch.get_num_threads()} torch threads; "
              f"{args.slices} of {n} slices fused, scaled to {n}")
        for k, v in times.items():
            print(f"  {k:45s} {v:8.2f} s")
        print(f"  {'outside the network, total':45s} {outside:8.2f} s")
        print(f"  {'network (denoiser loop, scaled)':45s} {network:8.2f} s   ({per_slice_net:.2f} s a slice)")
        print(f"outside the network: {100 * outside / (outside + network):.1f} % of the fuse (target < 10 %)")
        if regs:
            print(f"registration: {sum(r.seconds for r in regs.values()):.1f} s for both (target <= 30 s)")


if __name__ == "__main__":
    main()
