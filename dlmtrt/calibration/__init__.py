"""Post-training 8-bit quantisation of the denoising step (`dlmtrt calibrate`): step inputs drawn from real
denoising trajectories and stratified by mask ratio (canvases.py), activation statistics per linear input
(statistics.py), and the quantised checkpoint (quantize.py) that the torch backend loads and `export` turns
into a Q/DQ ONNX graph."""
