"""The one contract per exported component: `core` (ComponentSpec, dims, dtypes, precision,
hashing), `shared` (the encoders and VAE every pipeline uses), one module per pipeline, and
`guided` (the fused guided-step graph derived from any per-step spec)."""
