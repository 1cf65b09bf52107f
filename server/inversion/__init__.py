"""Photo inversion into a StyleGAN's latent space, the photo's framing, named identities.

``invert.PhotoInverter`` (photo -> ``Inversion``), ``losses`` (pixel, LPIPS, dlib identity and
landmark terms), ``optimise`` (W / W+ optimisation), ``frame`` (unaligned photos: roll and
shift), ``identities`` (the data folder's named identities). Importing the package is cheap;
its modules load torch and dlib when used.
"""
