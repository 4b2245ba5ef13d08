from setuptools import find_packages, setup

setup(
    name="optimum-lrpqvit",
    version="0.1.0",
    description="LRP-QViT post-training quantization of vision transformers (ViT, DeiT, Swin) for Hugging Face",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # optimum-cli finds `optimum-cli lrpqvit` in the optimum.commands.register namespace
    packages=[*find_packages(include=["optimum_lrpqvit", "optimum_lrpqvit.*"]), "optimum.commands.register"],
    package_data={"optimum_lrpqvit": ["model_cards/*.md"]},  # a link to the repository's model_cards/
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0",
        "transformers>=5.24,<6",
        "datasets>=3.0",
        "accelerate>=1.0",
        "optimum>=1.20",
        "safetensors>=0.4",
        "huggingface_hub>=0.30",
        "tqdm",
        "numpy",
        "pillow",
        "scipy>=1.9",
        "matplotlib",
        "jinja2",  # model cards (huggingface_hub.ModelCard.from_template)
    ],
    extras_require={"dev": ["pytest>=8", "hypothesis>=6", "flask>=2", "requests", "pyyaml"]},
    entry_points={"console_scripts": ["lrpqvit=optimum_lrpqvit.cli:main"]},
)
