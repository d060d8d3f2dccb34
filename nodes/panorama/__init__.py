"""360° panoramas: gnomonic tangent planes (OmniSSR's layout and a cube map), their merge back, WS-PSNR/WS-SSIM."""
