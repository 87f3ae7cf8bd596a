"""The samplers: latent schedulers (`schedulers`), the one latent denoising loop (`loop`) and
DiffusionDet's box diffusion (`boxes`). numpy only; the networks are called through components."""
