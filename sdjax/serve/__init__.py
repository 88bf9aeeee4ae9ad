"""python -m sdjax.serve: the AUTOMATIC1111 WebUI's HTTP API and a web page over sdjax, with
concurrent requests merged into compiled, sharded calls. Needs the ``[serve]`` extra."""
