import sys
import copy
import time
import torch

sys.path.insert(0, "/work/main/python")
import edkm
from edkm.models import load_model
from edkm.data import corpus_split, read_texts
from edkm.evaluate import perplexity

torch.manual_seed(0)
model, tok = load_model("smollm2-135m", torch.float32)
model.eval()
train, test = corpus_split("/work/shared/data")
val = [f for f in train if "emma" in str(f)]  # validation text from the train files
texts = read_texts(val)


def ppl(m):
    return perplexity(m, tok, texts, context_len=512, stride=256, max_tokens=2048, progress=False)["ppl"]


print("baseline", ppl(model), flush=True)
for kw in eval(sys.argv[1]):
    m = copy.deepcopy(model)
    t = time.time()
    edkm.palettize_(m, edkm.Config(**kw))
    edkm.finalize(m)
    print(kw, "ppl %.2f" % ppl(m), "%.0fs" % (time.time() - t), flush=True)
