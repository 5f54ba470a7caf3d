"""Dense Connector family: TinyCLIP + Llama-3.2 with dense connectors, two-stage tuning and
UMAP data curation."""
