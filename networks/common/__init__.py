"""Torch pieces every network family uses: fused-exportable attention (`attention`), the guided-step
wrapper (`guided`) and the spec-keyed call of a module (`runner`)."""
