"""fewstep.train: PyTorch training of small UNet denoisers (needs the ``train`` extra)."""
