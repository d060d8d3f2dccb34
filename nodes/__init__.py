"""Atelier's node pack: one subpackage per technique, shared code in ``common``.

Only relative imports live here: inside ComfyUI, ``import nodes`` is ComfyUI's own module.
"""

import os

from .correspondence import nodes as correspondence_nodes
from .cutout import nodes as cutout_nodes
from .dragedit import nodes as dragedit_nodes
from .fasterdiffusion import nodes as fasterdiffusion_nodes
from .fewstep import nodes as fewstep_nodes
from .generation import nodes as generation_nodes
from .highres import nodes as highres_nodes
from .inheritance import nodes as inheritance_nodes
from .inpaint import nodes as inpaint_nodes
from .loaders import nodes as loader_nodes
from .magicface import nodes as magicface_nodes
from .noisediffusion import nodes as noisediffusion_nodes
from .noiseshift import nodes as noiseshift_nodes
from .normals import nodes as normals_nodes
from .p4d import nodes as p4d_nodes
from .panorama import nodes as panorama_nodes
from .router import nodes as router_nodes
from .sada import nodes as sada_nodes
from .seamless import nodes as seamless_nodes
from .superres import nodes as superres_nodes
from .tstitch import nodes as tstitch_nodes
from .watermark import nodes as watermark_nodes

_TECHNIQUES = (loader_nodes, generation_nodes, highres_nodes, panorama_nodes, correspondence_nodes, watermark_nodes,
               router_nodes, noiseshift_nodes, fasterdiffusion_nodes, tstitch_nodes,
               sada_nodes, inheritance_nodes, seamless_nodes, inpaint_nodes, noisediffusion_nodes,
               magicface_nodes, fewstep_nodes, superres_nodes, cutout_nodes, normals_nodes,
               dragedit_nodes)
# Dual-use evaluation tools (P4D finds prompts that evade safety mechanisms) join the node list only when the
# setting asks for them
if os.environ.get(p4d_nodes.EVALUATION_SETTING) == "1":
    _TECHNIQUES += (p4d_nodes,)
NODE_CLASS_MAPPINGS: dict[str, type] = {name: cls for module in _TECHNIQUES
                                        for name, cls in module.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {name: label for module in _TECHNIQUES
                                              for name, label in module.NODE_DISPLAY_NAME_MAPPINGS.items()}
