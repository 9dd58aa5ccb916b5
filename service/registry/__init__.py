"""The model registry: named models per tenant, numbered versions, gated aliases."""
