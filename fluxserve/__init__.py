"""fluxserve: FLUX.1-dev optimization stacks served as Triton Inference Server models.

Modules, one concept each:
  stacks     the declarative catalog: each optimization stack a validated value
  weights    where the weights come from (local folder, local HF cache, synthetic)
  synthetic  FLUX-architecture pipelines with random weights, built offline
  optimize   one small function per optimization (attention, cache, quantization, compile)
  pipeline   (stack, weights, device) -> a warmed-up pipeline that generates and counts steps
  contract   the request contract: input/output names, limits, validation
  repository generates model_repository/ from the catalog
  triton_model  the Triton Python-backend model every stack runs
  serve      launches the real tritonserver on the repository
"""
