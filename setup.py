"""fusion: transfer learning from a hub of pre-trained models (JAX/Flax)."""
import setuptools

# Ranges that install together on Python 3.11 (here) and 3.12 (Colab).
# `make` pins the exact versions of constraints.txt on top of these.
INSTALL_REQUIRES = [
    # CPU; GPU/TPU users add their plugin (jax[cuda12], jax[tpu]). Not 0.10.0-0.10.2:
    # their x86-64 CPU compiler aborts or miscompiles some programs (jax-ml/jax
    # #39103, #39264); our CI aborted in a jitted train step under 0.10.2.
    "jax>=0.7,!=0.10.0,!=0.10.1,!=0.10.2,<0.11",
    "flax>=0.11,<0.13",  # flax 0.12.7 and later need jax>=0.10.
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11,<0.13",
    "ml-collections>=1.0,<2",
    "numpy>=1.26,<3",
    "tensorflow-cpu>=2.18,<2.22",  # only fusion/data/ imports it (tf.data, TFDS).
    "tensorflow-datasets>=4.9.8,<5",
    # TFDS's download_and_prepare of builders outside its own package (the
    # VTAB datasets' too) imports it and does not declare it.
    "importlib_resources>=6",
    "transformers>=4.57,<5",  # version 5 removed every Flax model.
    "huggingface-hub>=0.34,<1.0",
    "safetensors>=0.4",
    "tqdm>=4.66",
    "tensorboardX>=2.6,<3",  # TensorBoard event files without TensorFlow (fusion.train).
    "matplotlib>=3.8",
    "scipy>=1.13",
    "scikit-learn>=1.5",
]

EXTRAS_REQUIRE = {
    # nbclient, nbformat, ipykernel: the tests execute colabs/quickstart.ipynb headless.
    # pytest-xdist: `make test` runs the test modules in two processes.
    "test": ["pytest>=8", "pytest-xdist>=3.6,<4", "hypothesis>=6.100", "nbclient>=0.10,<1",
             "nbformat>=5.10,<6", "ipykernel>=6.29,<8"],
    "bench": ["psutil>=5.9"],
}

setuptools.setup(
    name="fusion",
    version="0.1.0",
    description="Choose, fine-tune, ensemble, fuse and route models from a hub; VTAB-1k.",
    packages=setuptools.find_packages(include=["fusion", "fusion.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
