"""Tensor operations behind the runner's core nodes, written to ComfyUI 0.3.64's behaviour (model-free but for ``vae``).

* :mod:`~airflow_comfy.runner.ops.image`: resizing (``common_upscale``), LoadImage / LoadImageMask,
  ImageScale / ImageScaleBy / ImageScaleToTotalPixels, ImageInvert, ImageBatch, ImagePadForOutpaint.
* :mod:`~airflow_comfy.runner.ops.canny`: the Canny node (kornia's algorithm, without kornia).
* :mod:`~airflow_comfy.runner.ops.latent`: EmptyLatentImage, LatentUpscale(By), LatentFromBatch,
  RepeatLatentBatch, SetLatentNoiseMask and the pixel/mask preparation of VAEEncodeForInpaint.
* :mod:`~airflow_comfy.runner.ops.save`: SaveImage / PreviewImage file names and PNG bytes.
* :mod:`~airflow_comfy.runner.ops.vae`: the VAE whole or in blended tiles (low-memory mode), and estimates of
  its largest allocation.

The submodules import torch (and PIL); import them directly, this package imports nothing.
"""
