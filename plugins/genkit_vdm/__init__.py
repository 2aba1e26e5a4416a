"""genkit's built-in variational diffusion model plugin (model name ``vdm``)."""

from genkit_vdm.base import VDMConfig
from genkit_vdm.continuous import ContinuousVDM
from genkit_vdm.model import VDM
from genkit_vdm.plugin import create_vdm

__all__ = ["VDM", "ContinuousVDM", "VDMConfig", "create_vdm"]
