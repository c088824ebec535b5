"""Small keras-hub backbones built from constructor arguments (random weights, no preset downloads).

Used by tests/test_zoo.py and scripts/zoo.py. Every builder takes the image
side and returns a built Functional model.
"""

from typing import Any, Callable, Dict


def mobilenet(side: int = 32) -> Any:
    import keras_hub

    return keras_hub.models.MobileNetBackbone(
        stackwise_expansion=[[40, 56], [64, 144]], stackwise_num_blocks=[2, 2],
        stackwise_num_filters=[[16, 16], [24, 24]], stackwise_kernel_size=[[3, 3], [5, 5]],
        stackwise_num_strides=[[2, 1], [2, 1]], stackwise_se_ratio=[[None, None], [0.25, 0.25]],
        stackwise_activation=[["relu", "relu"], ["hard_swish", "hard_swish"]],
        stackwise_padding=[[1, 1], [2, 2]], output_num_filters=64, depthwise_filters=8, depthwise_stride=2,
        depthwise_residual=False, last_layer_filter=96, squeeze_and_excite=0.5, image_shape=(side, side, 3),
    )  # fmt: skip


def resnet(side: int = 32) -> Any:
    import keras_hub

    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[16], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 32],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="bottleneck_block",
        image_shape=(side, side, 3),
    )  # fmt: skip


def cspnet(side: int = 32) -> Any:
    import keras_hub

    return keras_hub.models.CSPNetBackbone(
        stem_filters=16, stem_kernel_size=3, stem_strides=1, stackwise_depth=[1, 1],
        stackwise_strides=[1, 2], stackwise_num_filters=[16, 32], block_type="dark_block", stage_type="dark",
        image_shape=(side, side, 3),
    )  # fmt: skip


def efficientnet(side: int = 32) -> Any:
    import keras_hub

    return keras_hub.models.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0] * 3, stackwise_depth_coefficients=[1.0] * 3,
        stackwise_kernel_sizes=[3, 3, 3], stackwise_num_repeats=[1, 1, 1],
        stackwise_input_filters=[16, 16, 24], stackwise_output_filters=[16, 24, 32],
        stackwise_expansion_ratios=[1, 4, 4], stackwise_squeeze_and_excite_ratios=[0.0, 0.0, 0.25],
        stackwise_strides=[1, 2, 2], stackwise_block_types=["fused", "fused", "unfused"],
        input_shape=(side, side, 3), num_features=64,
    )  # fmt: skip


def vit(side: int = 32) -> Any:
    import keras_hub

    return keras_hub.models.ViTBackbone(
        image_shape=(side, side, 3), patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
    )  # fmt: skip


BACKBONES: Dict[str, Callable[[int], Any]] = {
    "MobileNetBackbone": mobilenet,
    "ResNetBackbone": resnet,
    "CSPNetBackbone": cspnet,
    "EfficientNetBackbone": efficientnet,
    "ViTBackbone": vit,
}
