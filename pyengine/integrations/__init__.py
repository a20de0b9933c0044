"""pyengine inside the trainers users already have: PyTorch Lightning (`lightning.py`) and
Hugging Face `Trainer` (`transformers.py`). Each imports its framework lazily, so pyengine
itself never needs them; install one with `pip install "pyengine[lightning]"` or
`"pyengine[transformers]"`."""
