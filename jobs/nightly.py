"""spark-submit entry point for the nightly job (same as `deltarec nightly`).

    ./spark-submit.sh jobs/nightly.py [--conf conf/local.yaml] [--set key=value ...]
"""
import sys

from deltarec.cli import entry

if __name__ == "__main__":
    entry(["nightly", *sys.argv[1:]])
