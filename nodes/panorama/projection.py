"""Equirectangular (ERP) <-> gnomonic tangent planes, batched and differentiable.

Conventions, used identically in both directions so that a round trip needs no pre-upsampling:

- ERP pixel (i, j) of an H×W image has its centre at longitude ``(j + ½)/W·2π − π`` (left to right) and latitude
  ``π/2 − (i + ½)/H·π`` (top row is north).
- Plane pixel (r, c) of an S×S plane has its centre at plane coordinates ``x = ((c + ½)/S·2 − 1)·tan(fov/2)``,
  ``y = (1 − (r + ½)/S·2)·tan(fov/2)``: x grows with longitude (east), y towards the north. The FOV is the true
  angular field of view.

Source: OmniSSR (Li et al., ECCV 2024), ``multi_viewer.py`` at 9ca4a4f, for the 18-plane layout and the Gaussian
merge window. Departure: OmniSSR mixes an edge-inclusive plane grid with ``align_corners=True`` one way and
``(u + 1)/2·H`` the other, which misregisters by up to ~1 px and forces a ×4 pre-upsampling; we use one pixel-centre
convention and need none. Its FOV "75" is a tangent half-extent of 75° in radians, i.e. 66.41° true angular FOV.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODES = ("bilinear", "bicubic")
# Source: OmniSSR multi_viewer.py, fov=(75, 75) read as a tangent half-extent of 0.75·π/3.6 = 0.6545.
OMNISSR_FOV_DEG = math.degrees(2 * math.atan(math.radians(75) / 2))
# Source: OmniSSR multi_viewer.py, nrows=4: (latitude, planes in the row).
OMNISSR_ROWS = ((-67.5, 3), (-22.5, 6), (22.5, 6), (67.5, 3))
# Source: OmniSSR multi_viewer.py, Mixture-of-Diffusers Gaussian window, sigma^2 = 0.01·size^2.
MERGE_SIGMA = 0.1
# bicubic reads two pixels either side of a sample; bilinear one
_PAD = 2
# ERP pixels per row segment that the merge tables rule out for a plane as a whole before testing single pixels
_SEGMENT_BITS = 5
_SEGMENT = 1 << _SEGMENT_BITS


@dataclass(frozen=True)
class PlaneLayout:
    """A set of square tangent planes: centres in degrees (longitude in [-180, 180), latitude in [-90, 90]), one
    true angular field of view and a side in pixels. Frozen, so it keys the grid cache."""

    centres: tuple[tuple[float, float], ...]
    fov_deg: float
    size: int

    def __post_init__(self) -> None:
        if not 0 < self.fov_deg < 180:
            raise ValueError(f"fov_deg must be in (0, 180); got {self.fov_deg}")
        if self.size < 1:
            raise ValueError(f"size must be at least 1; got {self.size}")
        if not self.centres:
            raise ValueError("a plane layout needs at least one plane; got none")
        for lon, lat in self.centres:
            if not (-180 <= lon < 180 and -90 <= lat <= 90):
                raise ValueError(f"plane centres must have longitude in [-180, 180) and latitude in [-90, 90]; "
                                 f"got ({lon}, {lat})")

    @property
    def count(self) -> int:
        return len(self.centres)


def omnissr_layout(size: int = 512, fov_deg: float = OMNISSR_FOV_DEG) -> PlaneLayout:
    """OmniSSR's "octadecaplex": rows of 3/6/6/3 planes at latitudes -67.5, -22.5, 22.5 and 67.5 degrees.

    Example:
        >>> layout = omnissr_layout(64)
        >>> layout.count, round(layout.fov_deg, 2)
        (18, 66.41)
    """
    # Source: OmniSSR multi_viewer.py; its longitudes 0..360 shifted by -180 into our [-180, 180) frame.
    centres = tuple((j * 360 / n + 180 / n - 180, lat) for lat, n in OMNISSR_ROWS for j in range(n))
    return PlaneLayout(centres, fov_deg, size)


def cube_layout(size: int = 512, fov_deg: float = 90.0) -> PlaneLayout:
    """A cube map: front, right, back, left, up, down faces (90 degrees; a wider FOV makes them overlap).

    Example:
        >>> cube_layout(32).centres
        ((0.0, 0.0), (90.0, 0.0), (-180.0, 0.0), (-90.0, 0.0), (0.0, 90.0), (0.0, -90.0))
    """
    return PlaneLayout(((0.0, 0.0), (90.0, 0.0), (-180.0, 0.0), (-90.0, 0.0), (0.0, 90.0), (0.0, -90.0)),
                       fov_deg, size)


def _check_erp(erp: torch.Tensor, name: str = "erp") -> None:
    if erp.ndim != 4 or erp.shape[-1] != 2 * erp.shape[-2] or erp.shape[-2] < 2:
        raise ValueError(f"{name} must have shape (B, C, H, 2H) with H >= 2; got {tuple(erp.shape)}")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")


def _rotations(layout: PlaneLayout) -> torch.Tensor:
    """(N, 3, 3) float64: columns are each plane's east, north and forward unit vectors in world (x, y, z),
    where world z points to longitude 0 on the equator, x to longitude 90 and y to the north pole."""
    lon = torch.tensor([c[0] for c in layout.centres], dtype=torch.float64).deg2rad()
    lat = torch.tensor([c[1] for c in layout.centres], dtype=torch.float64).deg2rad()
    forward = torch.stack([lat.cos() * lon.sin(), lat.sin(), lat.cos() * lon.cos()], -1)
    east = torch.stack([lon.cos(), torch.zeros_like(lon), -lon.sin()], -1)
    north = torch.linalg.cross(forward, east)
    return torch.stack([east, north, forward], -1)


def _plane_coordinates(size: int, half: float) -> torch.Tensor:
    return ((torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1) * half


def plane_directions(layout: PlaneLayout) -> torch.Tensor:
    """Unit ray of every plane pixel centre, (N, S, S, 3) float64 world (x, y, z); see :func:`_rotations`.

    Example:
        >>> plane_directions(cube_layout(2)).shape
        torch.Size([6, 2, 2, 3])
    """
    half = math.tan(math.radians(layout.fov_deg) / 2)
    x = _plane_coordinates(layout.size, half)
    y = -x  # row 0 is the top of the plane
    rays = torch.stack(torch.broadcast_tensors(x[None, :], y[:, None], torch.ones(1, 1, dtype=torch.float64)), -1)
    rays = rays / rays.norm(dim=-1, keepdim=True)
    return torch.einsum("nij,rcj->nrci", _rotations(layout), rays)


def _erp_pixel(direction: torch.Tensor, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous ERP pixel coordinates (column, row) of unit directions, column wrapped into [-½, W - ½)."""
    lon = torch.atan2(direction[..., 0], direction[..., 2])
    lat = torch.asin(direction[..., 1].clamp(-1, 1))
    width = 2 * height
    column = torch.remainder((lon + math.pi) / (2 * math.pi) * width, width) - 0.5
    row = (math.pi / 2 - lat) / math.pi * height - 0.5
    return column, row


def _pad_sphere(erp: torch.Tensor, pad: int) -> torch.Tensor:
    """Pads an ERP so that every sample near an edge reads its true spherical neighbour: columns wrap around
    (PyTorch has no circular grid_sample padding, pytorch #24089) and rows beyond a pole come back down the
    other side, half a turn away."""
    width = erp.shape[-1]
    over_north = erp[..., :pad, :].flip(-2).roll(width // 2, -1)
    over_south = erp[..., -pad:, :].flip(-2).roll(width // 2, -1)
    erp = torch.cat([over_north, erp, over_south], -2)
    return torch.cat([erp[..., -pad:], erp, erp[..., :pad]], -1)


def _normalise(coordinate: torch.Tensor, size_padded: int) -> torch.Tensor:
    """Pixel coordinate in a padded image -> grid_sample's [-1, 1] with align_corners=False (pixel centres)."""
    return (coordinate + 0.5) / size_padded * 2 - 1


@functools.lru_cache(maxsize=16)
def _e2p_grid(layout: PlaneLayout, height: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """grid_sample's grid of every plane pixel into the padded ERP, planes stacked along the rows.

    Turning a plane about the polar axis by its longitude moves its ERP samples along the columns only, so the
    trigonometry runs once per distinct latitude (4 times for OmniSSR's 18 planes), on a plane at longitude 0, and
    each plane shifts and wraps those columns; the result equals computing every plane's rays (to float64 rounding).
    """
    width = 2 * height
    grid = torch.empty(layout.count, layout.size, layout.size, 2, dtype=dtype)
    at_latitude: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    for plane, (lon, lat) in enumerate(layout.centres):
        if lat not in at_latitude:
            meridian = PlaneLayout(((0.0, lat),), layout.fov_deg, layout.size)
            column, row = _erp_pixel(plane_directions(meridian)[0], height)
            at_latitude[lat] = column + 0.5, _normalise(row + _PAD, height + 2 * _PAD)
        column_edge, row = at_latitude[lat]
        column = torch.remainder(column_edge + lon / 360 * width, width) - 0.5
        grid[plane, ..., 0] = _normalise(column + _PAD, width + 2 * _PAD)
        grid[plane, ..., 1] = row
    return grid.reshape(1, layout.count * layout.size, layout.size, 2).to(device)


def erp_to_planes(erp: torch.Tensor, layout: PlaneLayout, mode: str = "bilinear") -> torch.Tensor:
    """Samples every tangent plane of ``layout`` from an ERP panorama in one ``grid_sample``.

    Args:
        erp: (B, C, H, 2H) equirectangular images, any float dtype and device.
        layout: the planes; see :func:`omnissr_layout` and :func:`cube_layout`.
        mode: "bilinear" or "bicubic".
    Returns:
        (B, N, C, S, S) planes, same device and dtype; differentiable in ``erp``.
    Raises:
        ValueError: ``erp`` not (B, C, H, 2H) or an unknown ``mode``.
    Example:
        >>> erp_to_planes(torch.rand(2, 3, 16, 32), cube_layout(8)).shape
        torch.Size([2, 6, 3, 8, 8])
    """
    _check_erp(erp)
    _check_mode(mode)
    batch, channels, height, _ = erp.shape
    grid = _e2p_grid(layout, height, erp.device, erp.dtype).expand(batch, -1, -1, -1)
    planes = F.grid_sample(_pad_sphere(erp, _PAD), grid, mode=mode, padding_mode="border", align_corners=False)
    return planes.reshape(batch, channels, layout.count, layout.size, layout.size).transpose(1, 2)


@dataclass(frozen=True)
class _MergeTables:
    """Per (plane, ERP pixel) pairs where the plane covers the pixel: the flat ERP index, the atlas grid point
    and the normalised merge weight (the weights of one ERP pixel sum to one)."""

    index: torch.Tensor
    grid: torch.Tensor
    weight: torch.Tensor


def _erp_directions(height: int) -> torch.Tensor:
    width = 2 * height
    lon = (torch.arange(width, dtype=torch.float64) + 0.5) / width * 2 * math.pi - math.pi
    lat = math.pi / 2 - (torch.arange(height, dtype=torch.float64) + 0.5) / height * math.pi
    lat, lon = lat[:, None], lon[None, :]
    return torch.stack(torch.broadcast_tensors(lat.cos() * lon.sin(), lat.sin(), lat.cos() * lon.cos()), -1)


def _near_segments(rotation: torch.Tensor, half: float, cos_lat: torch.Tensor, sin_lat: torch.Tensor,
                   centre_lon: torch.Tensor, reach: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, segment) of the ERP row segments that may hold a pixel the plane covers, in row-major order.

    The plane covers the directions d with |east·d| <= h·forward·d and |north·d| <= h·forward·d: four half-spaces
    w·d >= 0. Every pixel of a segment lies within ``reach`` of the segment's centre c (its half-length along the
    latitude circle, which no chord exceeds), so w·d <= w·c + |w|·reach there: where that bound is negative for some
    wall the segment holds no covered pixel.
    """
    east, north, forward = rotation.unbind(1)
    near = torch.ones(cos_lat.shape[0], centre_lon.shape[0], dtype=torch.bool)
    for wall in (half * forward - east, half * forward + east, half * forward - north, half * forward + north):
        x_part, y_part, z_part = wall.tolist()
        bound = cos_lat * (x_part * centre_lon.sin() + z_part * centre_lon.cos()) + y_part * sin_lat
        near &= bound >= -wall.norm().item() * reach
    return near.nonzero(as_tuple=True)


@functools.lru_cache(maxsize=8)
def _merge_tables(layout: PlaneLayout, height: int, device: torch.device, dtype: torch.dtype) -> _MergeTables:
    """The merge's gather tables: for each plane, every ERP pixel it covers (ascending) with its atlas grid point
    and Gaussian window, the windows then normalised per ERP pixel.

    Testing all H·2H pixels against every plane would cost 18 full-image passes; rows are cut into segments of
    ``_SEGMENT`` pixels that :func:`_near_segments` rules out as a whole, and only the rest (about 3 % more pixels
    than the hits) are computed and tested in float64, so the hits are those of a per-pixel test.
    """
    width, size, padded = 2 * height, layout.size, layout.size + 2 * _PAD
    half = math.tan(math.radians(layout.fov_deg) / 2)
    segments = -(-width // _SEGMENT)
    lat = math.pi / 2 - (torch.arange(height, dtype=torch.float64) + 0.5) / height * math.pi
    cos_lat, sin_lat = lat.cos()[:, None], lat.sin()[:, None]
    lon = (torch.arange(segments * _SEGMENT, dtype=torch.float64) + 0.5) / width * 2 * math.pi - math.pi
    sin_lon, cos_lon = lon.sin(), lon.cos()
    # the last segment may run past the row's end: its extra columns read NaN, which fails every test below
    sin_lon[width:], cos_lon[width:] = math.nan, math.nan
    centre_lon = (torch.arange(segments, dtype=torch.float64) * _SEGMENT + _SEGMENT / 2) / width * 2 * math.pi - math.pi
    # float64 rounding of w·d is ~1e-16; the margin keeps every segment a rounding error could matter for
    reach = cos_lat * ((_SEGMENT - 1) / 2 * 2 * math.pi / width) + 1e-9
    rotations = _rotations(layout)
    candidates = [_near_segments(rotation, half, cos_lat, sin_lat, centre_lon, reach) for rotation in rotations]
    # allocated once for every candidate pixel (a bound on the hits) and trimmed, rather than concatenated per plane
    bound = sum(row.numel() for row, _ in candidates) * _SEGMENT
    index = torch.empty(bound, dtype=torch.int64)
    grid = torch.empty(bound, 2, dtype=dtype)
    weight = torch.empty(bound, dtype=dtype)
    total = torch.zeros(height * width, dtype=dtype)
    filled = 0
    for plane, (rotation, (row, segment)) in enumerate(zip(rotations, candidates)):
        # each candidate pixel's direction (cos lat·sin lon, sin lat, cos lat·cos lon) along the plane's axes
        row_cos, row_sin = cos_lat.index_select(0, row), sin_lat.index_select(0, row)
        east, north, forward = (torch.addcmul(axis[1] * row_sin, row_cos, (axis[0] * sin_lon + axis[2] * cos_lon)
                                              .view(segments, _SEGMENT).index_select(0, segment))
                                for axis in rotation.unbind(1))
        inverse = forward.reciprocal_()
        x, y = east.mul_(inverse), north.mul_(inverse)  # plane coordinates, ±half at the plane's edges
        inside = torch.maximum(x.abs(), y.abs()).le_(half).logical_and_(inverse > 0).view(-1)
        flat = inside.nonzero().squeeze(1)
        hits = slice(filled, filled + flat.numel())
        filled = hits.stop
        # candidate c's pixel k is flat index c·_SEGMENT + k (a power of two: shift and mask)
        start = row * width + segment * _SEGMENT
        torch.add(start.index_select(0, flat >> _SEGMENT_BITS), flat & (_SEGMENT - 1), out=index[hits])
        # the inside test needed float64; the tables are kept in ``dtype``
        x, y = x.view(-1).index_select(0, flat).to(dtype), y.view(-1).index_select(0, flat).to(dtype)
        # plane pixel (x/half + 1)/2·S - ½ in a plane with a _PAD border, planes one above the other in the atlas,
        # in grid_sample's [-1, 1] (align_corners=False): the border and the half pixel cancel out
        torch.mul(x, size / (half * padded), out=grid[hits, 0])
        torch.add(torch.tensor((2 * plane + 1) / layout.count - 1, dtype=dtype), y,
                  alpha=-size / (half * padded * layout.count), out=grid[hits, 1])
        # the Gaussian window exp(-r²/(2σ²S²)) at plane pixel distance r = S/(2·half)·|(x, y)| from the centre
        window = torch.addcmul(x * x, y, y, out=weight[hits]).mul_(-1 / (8 * (MERGE_SIGMA * half) ** 2)).exp_()
        total.index_add_(0, index[hits], window)
    index, grid = index[:filled], grid[:filled]
    # one reciprocal per ERP pixel, gathered: a division per pair costs 3× as much
    weight = weight[:filled].mul_(total.reciprocal_().index_select(0, index))
    return _MergeTables(index.to(device), grid.reshape(1, 1, -1, 2).to(device), weight.to(device))


def planes_to_erp(planes: torch.Tensor, layout: PlaneLayout, height: int, mode: str = "bilinear") -> torch.Tensor:
    """Merges tangent planes back into an ERP panorama: each ERP pixel is the average of the planes covering it,
    sampled at the same pixel-centre geometry as :func:`erp_to_planes`, with Gaussian weights that sum to one.

    Args:
        planes: (B, N, C, S, S) with N and S matching ``layout``.
        layout: the planes' layout.
        height: ERP height H (the width is 2H), at least 2.
        mode: "bilinear" or "bicubic".
    Returns:
        (B, C, H, 2H) ERP; pixels no plane covers are 0 (see :func:`coverage`). Differentiable in ``planes``.
    Raises:
        ValueError: ``planes`` does not match ``layout``, ``height`` < 2 or an unknown ``mode``.
    Example:
        >>> erp = torch.rand(1, 3, 16, 32)
        >>> planes_to_erp(erp_to_planes(erp, cube_layout(8)), cube_layout(8), 16).shape
        torch.Size([1, 3, 16, 32])
    """
    _check_mode(mode)
    if planes.ndim != 5 or planes.shape[1] != layout.count or planes.shape[-2:] != (layout.size, layout.size):
        raise ValueError(f"planes must have shape (B, {layout.count}, C, {layout.size}, {layout.size}) for this "
                         f"layout; got {tuple(planes.shape)}")
    if height < 2:
        raise ValueError(f"height must be at least 2; got {height}")
    batch, count, channels, size, _ = planes.shape
    tables = _merge_tables(layout, height, planes.device, planes.dtype)
    atlas = F.pad(planes.reshape(batch * count, channels, size, size), (_PAD,) * 4, mode="replicate")
    atlas = atlas.reshape(batch, count, channels, size + 2 * _PAD, size + 2 * _PAD).transpose(1, 2)
    atlas = atlas.reshape(batch, channels, count * (size + 2 * _PAD), size + 2 * _PAD)
    samples = F.grid_sample(atlas, tables.grid.expand(batch, -1, -1, -1), mode=mode, padding_mode="border",
                            align_corners=False)[:, :, 0]
    erp = planes.new_zeros(batch, channels, 2 * height * height)
    erp = erp.index_add(2, tables.index, samples * tables.weight)
    return erp.reshape(batch, channels, height, 2 * height)


def coverage(layout: PlaneLayout, height: int) -> dict[str, float]:
    """How ``layout`` covers an ERP of H×2H pixels: the fraction of pixels and of the sphere's area covered by at
    least one plane, the mean number of planes per covered pixel and the most planes over one pixel.

    Example:
        >>> report = coverage(omnissr_layout(64), 64)
        >>> report["covered"], report["max_planes"]
        (1.0, 4.0)
    """
    index = _merge_tables(layout, height, torch.device("cpu"), torch.float32).index.cpu()
    count = torch.bincount(index, minlength=2 * height * height).reshape(height, 2 * height)
    lat = math.pi / 2 - (torch.arange(height, dtype=torch.float64) + 0.5) / height * math.pi
    area = lat.cos()[:, None].expand_as(count)
    covered = count > 0
    return {"covered": covered.double().mean().item(),
            "covered_area": (area * covered).sum().item() / area.sum().item(),
            "mean_planes": count[covered].double().mean().item() if covered.any() else 0.0,
            "max_planes": float(count.max().item())}


# fixed, irrational-looking directions so that no channel's pattern lines up with the ERP grid or a plane
_TEXTURE_AXES = ((0.48, 0.6, 0.64), (-0.8, 0.36, 0.48), (0.28, -0.96, 0.0))


def direction_texture(directions: torch.Tensor, frequency: float) -> torch.Tensor:
    """An RGB colour known analytically in every direction: plane waves along fixed axes on the unit sphere,
    smooth everywhere (poles and the ±180° meridian included), band-limited by ``frequency``.

    Args:
        directions: (..., 3) unit vectors (x east at longitude 90°, y north, z at longitude 0).
        frequency: angular frequency in radians⁻¹, > 0; higher is more detail.
    Returns:
        (3, ...) values in [0.1, 0.9], float64 for float64 input.
    Example:
        >>> direction_texture(torch.tensor([[0.0, 1.0, 0.0]]), 4.0).shape
        torch.Size([3, 1])
    """
    if not frequency > 0:
        raise ValueError(f"frequency must be > 0; got {frequency}")
    axes = torch.tensor(_TEXTURE_AXES, dtype=directions.dtype, device=directions.device)
    phase = directions @ axes.T * frequency  # (..., 3)
    channels = [0.5 + 0.25 * torch.sin(phase[..., k] + k) + 0.15 * torch.cos(phase[..., (k + 1) % 3] * 0.7)
                for k in range(3)]
    return torch.stack(channels, 0)


def synthetic_panorama(height: int, frequency: float = 12.0) -> torch.Tensor:
    """An H×2H ERP of :func:`direction_texture` sampled at the ERP pixel centres, shape (1, 3, H, 2H) float32.

    Example:
        >>> synthetic_panorama(8).shape
        torch.Size([1, 3, 8, 16])
    """
    if height < 2:
        raise ValueError(f"height must be at least 2; got {height}")
    return direction_texture(_erp_directions(height), frequency).float()[None]
