"""Official metrics of the downstream benchmarks: VQA, COCO captions, NLVR2, SNLI-VE."""
