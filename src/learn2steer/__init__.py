"""learn2steer: input-dependent activation steering (Learn-to-Steer) for Hugging Face LLMs and VLMs."""

__version__ = "0.1.0"
