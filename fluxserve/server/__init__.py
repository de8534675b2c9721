"""The Triton side below the entry points (`fluxserve.serve`, `fluxserve.triton_model`): a model instance's service
(`serving`), where instances run (`placement`), the PNG output (`png`)."""
