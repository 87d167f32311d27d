"""Probe: per-call cost of the steering write and a plain/L2S/zero-vector generate side by side (batch 16, 48 tokens).

Run from the repository root: python benchmarks/overhead_probe.py
"""
import statistics
import time

import torch

from learn2steer import PromptRow, build_inputs, load_default_model
from learn2steer.benchmarks.datasets import demo_requests
from learn2steer.methods import L2SProvider
from learn2steer.predictor import L2SNet
from learn2steer.steering import steer

h=load_default_model()
batch=build_inputs(h,[PromptRow(e.question) for e in demo_requests()[:16]])
net=L2SNet(576,576); gen=dict(max_new_tokens=48,min_new_tokens=48,do_sample=False,pad_token_id=h.tokenizer.pad_token_id,temperature=None,top_p=None,top_k=None)
def plain():
    with torch.no_grad(): h.model.generate(**batch.inputs,**gen)
def l2s():
    with steer(h,L2SProvider(net,12,(12,)),alpha=0.5), torch.no_grad(): h.model.generate(**batch.inputs,**gen)
def zero():
    with steer(h,{12: torch.zeros(576)},alpha=0.5), torch.no_grad(): h.model.generate(**batch.inputs,**gen)
plain()
T={'plain':[], 'l2s':[], 'zero':[]}
for r in range(6):
    for k,f in ([('plain',plain),('l2s',l2s),('zero',zero)] if r%2==0 else [('zero',zero),('l2s',l2s),('plain',plain)]):
        t=time.perf_counter(); f(); T[k].append(time.perf_counter()-t)
for k,v in T.items(): print(k, [round(x,2) for x in v], 'median', round(statistics.median(v),3))
# hook cost microbenchmark: one decode-size hidden
from learn2steer.steering import scope_mask

x=torch.randn(16,1,576); m=torch.ones(16,1,dtype=torch.bool); v=torch.randn(16,576)
t=time.perf_counter()
for _ in range(10000): torch.where(scope_mask('all', m, 100, 90).unsqueeze(-1), x+0.5*v.unsqueeze(-2), x)
print('per-call us', (time.perf_counter()-t)/10000*1e6)
