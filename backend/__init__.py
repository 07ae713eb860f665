"""The labelassist service: the Label Studio ML-backend protocol, settings, queue client and CLI. No torch."""
