from onnxopt.cli import main

main(prog_name="onnxopt")
