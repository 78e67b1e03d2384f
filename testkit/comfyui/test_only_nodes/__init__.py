"""Test doubles installed as a second custom-node pack in the test ComfyUI: inputs core nodes cannot make."""

import torch


class TestEmptyImageBatch:
    """An IMAGE batch with zero images, as a buggy upstream node might produce."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self):
        return (torch.zeros(0, 64, 64, 3),)


NODE_CLASS_MAPPINGS = {"TestEmptyImageBatch": TestEmptyImageBatch}
