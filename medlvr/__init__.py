"""medlvr: latent visual reasoning for medical visual question answering."""

__version__ = "0.1.0"
