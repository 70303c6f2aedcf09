"""Model families and the registry of ready-made configurations."""
from .registry import (compile_model, create_model, inductor_options, list_models, model_config, model_entry,
                       register_model)
from .vmamba import SS2D, VSSBlock, VSSEncoder, set_grad_checkpointing
from .vmamba_fast import VSSBlockFast, VSSEncoderFast
from .vmunet import VMUNet

register_model("vmunet_isic", VMUNet, "published VM-UNet, ISIC config: depths [2,2,2,2] / decoder [2,2,2,1]",
               dims=[96, 192, 384, 768], depths=[2, 2, 2, 2], depths_decoder=[2, 2, 2, 1], d_state=16,
               drop_path_rate=0.2, family="v0")
register_model("vmunet", VMUNet, "published VM-UNet default: depths [2,2,9,2] / decoder [2,9,2,2]",
               dims=[96, 192, 384, 768], depths=[2, 2, 9, 2], depths_decoder=[2, 9, 2, 2], d_state=16,
               drop_path_rate=0.2, family="v0")
register_model("vmunet_fast", VMUNet, "VMamba v2 blocks (d_state 1, MLP, channel-first) in the VM-UNet wiring",
               dims=[96, 192, 384, 768], depths=[2, 2, 2, 2], depths_decoder=[2, 2, 2, 1], d_state=1,
               drop_path_rate=0.2, family="fast", ssm_ratio=1.0, mlp_ratio=4.0)
# Scan routes from the Vision-Mamba family on the ISIC config (route overrides work on every name:
# create_model("vmunet_isic", route="window:4")).
_ISIC = dict(dims=[96, 192, 384, 768], depths=[2, 2, 2, 2], depths_decoder=[2, 2, 2, 1], d_state=16,
             drop_path_rate=0.2, family="v0")
for _route, _what in [("bidirectional", "Vim bidirectional row scan (K=2) + learnable position embedding"),
                      ("zigzag", "continuous snake scans (K=4: row-/column-snake and reverses)"),
                      ("window", "LocalMamba local 8x8-window scans (K=4); route='window:S' sets S"),
                      ("quadtree", "QuadMamba learnable quadtree scan (K=2), 1 of 4 quadrants refined per sample")]:
    register_model(f"vmunet_isic_{_route}", VMUNet, f"VM-UNet ISIC config, {_what}", route=_route, **_ISIC)
del _ISIC, _route, _what

__all__ = ["SS2D", "VMUNet", "VSSBlock", "VSSBlockFast", "VSSEncoder", "VSSEncoderFast", "compile_model",
           "create_model", "inductor_options", "list_models", "model_config", "model_entry", "register_model",
           "set_grad_checkpointing"]
