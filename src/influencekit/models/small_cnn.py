"""Koh & Liang's (2017) small all-convolutional tanh network for 28 x 28 MNIST (Figure 2, right panel)."""

from __future__ import annotations

from torch import nn

STRIDES = (1, 2, 1, 2, 1)


def koh_liang_cnn(channels: int = 8, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """Five 3x3 'valid' tanh convolutions (strides 1, 2, 1, 2, 1), a 1x1 tanh convolution to
    ``num_classes`` channels, global average pooling and a ``num_classes`` -> ``num_classes``
    linear layer, all with biases (Koh & Liang's ``All_CNN_C``: every convolution, the 1x1 one
    included, is followed by tanh). Takes flat images (B, image_size**2). With the defaults:
    2,616 parameters; spatial sizes 28 -> 26 -> 12 -> 10 -> 4 -> 2.

    The tanh after the 1x1 convolution matters for influence functions: without it the logits
    W2 (W1 avg(h) + b1) + b2 and the penalty (wd/2)(||W1||^2 + ||b1||^2 + ||W2||^2) are unchanged
    by (W1, b1, W2) -> (Q W1, Q b1, W2 Q^T) for every orthogonal Q in O(num_classes), so R is constant
    along a manifold through every point, and at any critical point with W1, b1 != 0 the Hessian has
    a null space (the orbit's tangent, dimension dim so(k) - dim so(k - rank [W1 b1]) >= k - 1, k = num_classes): no such
    model can be at a minimum with H positive definite.
    """
    layers: list[nn.Module] = [nn.Unflatten(1, (1, image_size, image_size))]
    in_channels = 1
    for stride in STRIDES:
        layers += [nn.Conv2d(in_channels, channels, 3, stride=stride), nn.Tanh()]
        in_channels = channels
    layers += [nn.Conv2d(channels, num_classes, 1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(num_classes, num_classes)]
    return nn.Sequential(*layers)
