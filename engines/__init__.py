"""Runtime denoisers behind one interface.

Every engine is a callable `denoiser(x_t, cond, noise_level) -> prediction` with
x_t [B,3,H,W] float32, cond [B,5,H,W] float32 and noise_level [B] float32 (sqrt(gamma)).
The prediction has the shape of x_t. The samplers in tfsdeploy.diffusion never ask which
engine they are running.
"""

from engines.base import Denoiser
from engines.torch_engine import TorchDenoiser

__all__ = ["Denoiser", "TorchDenoiser"]
