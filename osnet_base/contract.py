"""The serving contract: the one declaration of what every side of the wire agrees on.

Export writes these tensor names and shapes into the ONNX graph, the repository writer into
config.pbtxt, the client and the load test send and check them, and the python-backend models read
the copy of this file that the repository writer puts beside each `model.py`. So this file must
stay importable alone: standard library only.
"""

DEFAULT_URL = "127.0.0.1:8001"  # Triton's gRPC port, on loopback: a server is never public by default

ENSEMBLE_MODEL = "osnet"  # encoded images in, embeddings out
PREPROCESS_MODEL = "preprocess"
FRAMES_MODEL = "osnet_frames"  # one encoded camera frame and its boxes in, one embedding per box out

IMAGE_NAME = "IMAGE"  # BYTES [N,1]: one encoded image per item
# UINT8 [N,256,128,3]: RGB pixels resized to the model's input, NHWC: the layout Pillow decodes to and
# a detector's frame is cut from, so neither side transposes in Python. The served graph itself casts,
# divides by 255, subtracts ImageNet's mean, divides by its std and transposes to NCHW.
INPUT_NAME = "INPUT"
FRAME_NAME = "FRAME"  # BYTES [1]: one encoded JPEG/PNG camera frame, within the preprocessor's budgets
BOXES_NAME = "BOXES"  # FP32 [K,4]: x1, y1, x2, y2 in the frame's pixels; EMBEDDING and FEATURES come back [K,512]
FEATURES_NAME = "FEATURES"  # FP32 [N,512]: torchreid's eval output
EMBEDDING_NAME = "EMBEDDING"  # FP32 [N,512]: FEATURES, L2-normalised

INPUT_CHANNELS, INPUT_HEIGHT, INPUT_WIDTH = 3, 256, 128
INPUT_DATATYPE = "UINT8"  # Triton's name; numpy uint8
INPUT_SHAPE = (INPUT_HEIGHT, INPUT_WIDTH, INPUT_CHANNELS)  # one item of INPUT
FEATURE_DIM = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# What the preprocessor decodes (Pillow's format names): no other decoder ever sees a client's bytes.
IMAGE_FORMATS = ("JPEG", "PNG")
IMAGE_FILE_SUFFIXES = (".jpg", ".jpeg", ".png")

DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_RUNTIME = "auto"  # the CPU runtime: measured at build time, see engine_builder.cpu_runtimes
