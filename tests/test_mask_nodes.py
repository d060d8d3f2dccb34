"""ComfyUI's SolidMask, MaskComposite and MaskToImage in the standalone app: ComfyUI's results on hand-checked cases
(the inpainting and DiffDIS tests of test_comfy_pack_models.py run them in ComfyUI and standalone and compare the
pictures)."""

from __future__ import annotations

import pytest
import torch

from web.nodes_mask import MaskComposite, MaskToImage, SolidMask, composite_masks


def test_solid_mask_is_one_value_of_batch_one():
    (mask,) = SolidMask().solid(0.25, 5, 3)
    assert mask.shape == (1, 3, 5) and mask.dtype == torch.float32 and torch.equal(mask, torch.full((1, 3, 5), 0.25))


@pytest.mark.parametrize(("operation", "expected"), [
    ("multiply", [0.3, 0.0]), ("add", [1.0, 0.3]), ("subtract", [0.1, 0.3]),
    # the logical ones round first, half to even as torch rounds: 0.6 -> 1, 0.5 -> 0, 0.3 -> 0
    ("and", [0.0, 0.0]), ("or", [1.0, 0.0]), ("xor", [1.0, 0.0]),
])
def test_operations_combine_where_the_masks_overlap_and_clamp(operation, expected):
    destination = torch.tensor([[[1.0, 0.6, 0.3]]])
    source = torch.tensor([[[0.5, 0.0]]])  # placed at x = 1: over 0.6 and 0.3
    out = composite_masks(destination, source, 1, 0, operation)
    assert out[0, 0, 0] == 1.0  # left of the source: the destination
    torch.testing.assert_close(out[0, 0, 1:], torch.tensor(expected))


def test_the_source_is_cut_at_the_destinations_edge_and_the_inputs_are_not_changed():
    destination, source = torch.zeros(2, 4, 4), torch.ones(1, 3, 3)
    out = MaskComposite().combine(destination, source, 2, 3, "add")[0]
    assert out.shape == (2, 4, 4) and out.sum() == 2 * 2 and torch.equal(out[:, 3, 2:], torch.ones(2, 2))
    assert destination.sum() == 0
    assert torch.equal(composite_masks(destination, source, 9, 9, "add"), destination)  # wholly outside
    with pytest.raises(ValueError, match="operation"):
        composite_masks(destination, source, 0, 0, "blend")


def test_solid_mask_follows_the_servers_pixel_budget():
    from web.limits import Limits, bind_limits

    bound = bind_limits({"SolidMask": SolidMask}, Limits(max_pixels=100))["SolidMask"]
    with pytest.raises(ValueError, match="pixel budget"):
        bound().solid(1.0, 20, 20)


def test_mask_to_image_repeats_the_mask_in_three_channels():
    mask = torch.tensor([[[0.0, 0.25], [1.0, 0.5]]])
    (image,) = MaskToImage().mask_to_image(mask)
    assert image.shape == (1, 2, 2, 3)
    assert all(torch.equal(image[..., channel], mask) for channel in range(3))
    assert MaskToImage().mask_to_image(mask[0])[0].shape == (1, 2, 2, 3)  # an unbatched mask, as ComfyUI takes it
