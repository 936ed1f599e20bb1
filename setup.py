from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="hookah",
    version="0.1.0",
    description="Hookah, the HTTP event engine: durable webhooks, a WebSub hub and streams",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9.12",  # what the Twisted floor (26.4) itself requires
    # twisted.plugins is a namespace without __init__.py: find_packages()
    # would drop it silently, and twistd would never see the hookah plugin.
    packages=find_packages(include=["hookah", "hookah.*"]) + ["twisted.plugins"],
    install_requires=[
        # The oldest Twisted the suite passes on (.ci/run tests it besides the
        # newest): 25.5 with pyOpenSSL >= 25.2 fails a TLS listener's second
        # connection, and older ones lack Site(parsePOSTFormSubmission=).
        "twisted[tls]>=26.4",
        "attrs>=22.2",
        "zope.interface>=6.0",
        "prometheus_client>=0.17",
        "tomli>=2.0; python_version < '3.11'",
    ],
    extras_require={
        # --storage postgresql://: several nodes on one database.
        "postgres": ["psycopg[binary]>=3.1", "psycopg-pool>=3.1"],
        "test": [
            "psycopg[binary]>=3.1",
            "psycopg-pool>=3.1",
            "pytest>=7",
            "treq>=23.11",
            "hypothesis>=6.80",
            "standardwebhooks>=1.0",
            "mypy>=1.8",
            "mypy-zope>=1.0",
            "ruff>=0.17,<0.18",  # ruff.toml; newer releases add rules
            "selenium>=4.10",
            "flask-websub>=0.4",
        ],
    },
    entry_points={"console_scripts": ["hookah=hookah.cli.main:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
