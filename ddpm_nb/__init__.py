"""ddpm_nb: the package behind the notebook-first DDPM course.

One module per noun of the paper: schedule, diffusion, unet, sample, data, train,
animate, metrics, config, utils. The notebooks in notebooks/ explain each one.
"""
__version__ = "0.1.0"
