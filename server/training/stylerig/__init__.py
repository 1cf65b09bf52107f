"""StyleRig training (Tewari et al., CVPR 2020): corpus -> landmarks -> F (DFR) -> RigNet.

Run ``python -m server.training.stylerig --help``; the recipe is in
``docs/stylerig_training.md``. Stages and their modules:

    corpus      ``corpus``        (w, image) pairs sampled from a frozen StyleGAN, in shards
    landmarks   ``landmarks``     68 dlib landmarks per image; faceless images are flagged
    dfr         ``train_dfr``     F: w -> face parameters, through the differentiable renderer
    rignet      ``train_rignet``  RigNet with L_rec + L_edit + L_consist (two-way swaps)
    evaluate    ``evaluate``      how closely edited faces follow the requested parameters
"""
