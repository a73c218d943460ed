"""voxd: bridge Twilio phone calls to voice-AI assistants, in real time."""

__version__ = "0.1.0"
