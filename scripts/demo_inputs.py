"""Write the demo's input images (a colour gradient and a disc mask, 64x64) into the folder given."""

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def main(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:64, 0:64]
    gradient = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).clip(0, 255).astype("uint8")
    Image.fromarray(gradient).save(out / "demo-input.png")
    disc = (((x - 32) ** 2 + (y - 32) ** 2) < 200).astype("uint8") * 255
    Image.fromarray(np.stack([disc] * 3, axis=-1)).save(out / "demo-mask.png")


if __name__ == "__main__":
    main(sys.argv[1])
