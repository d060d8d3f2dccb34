"""The embedded default model: a tiny SD1-layout text-to-image model trained in code, on the CPU.

``dataset`` generates the captioned training scenes (coloured shapes on plain, gradient, striped and horizon
backgrounds) and the held-out evaluation captions; ``train`` trains the autoencoder, then the UNet and the text
encoder, and writes the result as a diffusers folder and an original-layout single file. No node classes live
here: the shipped model is loaded by the generation nodes like any other checkpoint.
"""
