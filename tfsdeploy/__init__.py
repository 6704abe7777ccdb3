"""tfsdeploy: train, compile and run TFS-Diff, tri-modal medical image fusion with super-resolution.

Kept light on purpose: importing the package pulls in torch and numpy only when a submodule
that needs them is imported.
"""

__version__ = "0.1.0"
