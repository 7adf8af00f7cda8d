"""Model-free tensor operations behind the runner's core nodes, written to ComfyUI 0.3.64's behaviour.

* :mod:`~airflow_comfy.runner.ops.image`: resizing (``common_upscale``), LoadImage / LoadImageMask,
  ImageScale / ImageScaleBy / ImageScaleToTotalPixels, ImageInvert, ImageBatch, ImagePadForOutpaint.
* :mod:`~airflow_comfy.runner.ops.canny`: the Canny node (kornia's algorithm, without kornia).
* :mod:`~airflow_comfy.runner.ops.latent`: EmptyLatentImage, LatentUpscale(By), LatentFromBatch,
  RepeatLatentBatch, SetLatentNoiseMask and the pixel/mask preparation of VAEEncodeForInpaint.
* :mod:`~airflow_comfy.runner.ops.save`: SaveImage / PreviewImage file names and PNG bytes.

The submodules import torch (and PIL); import them directly, this package imports nothing.
"""
