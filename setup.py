"""Install Postbox: ``pip install -e .`` (service) or ``pip install -e .[test]`` (tests)."""

from setuptools import find_packages, setup

setup(
    name="postbox",
    version="0.1.0",
    description="Run a medical image analysis tool as a service: folder, DICOM and HTTP doors",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "facade", "facade.*"]),
    package_data={"pipeline": ["py.typed"], "facade": ["py.typed", "views/*.tpl", "static/*"]},
    install_requires=[
        "watchdog>=4",
        "bottle>=0.13",
        "pydicom>=2.4",
        "SimpleITK>=2.3",
        "pynetdicom>=2.0",
        "tinydb>=4.8",
        "pyyaml>=6",
        "filelock>=3.12",
        "numpy>=1.24",
        "scipy>=1.10",
        "highdicom>=0.22",
        "opencv-python-headless>=4.8",
        "cheroot>=10",
        "multipart>=1.1",
        "requests>=2.31",
        "tqdm>=4.60",
        "cryptography>=41",
        "matplotlib>=3.7",
        "prometheus-client>=0.17",
        "distributed>=2024.1",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.2",
            "rt-utils>=1.2.7",
            "ruff>=0.5",
            "mypy>=1.10",
            "types-PyYAML",
            "selenium>=4.10",
        ],
    },
    entry_points={"console_scripts": ["postbox = facade.cli:main"]},
)
