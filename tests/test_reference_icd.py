"""ICD against a plain-torch transcription of the official code (megvii-research/ICD @acf2726).

Long on purpose: a float64 transcription of the official code, kept in one file so it reads side by
side with it (each ``official_*`` function names what it transcribes, below).

Transcribed from ``pytorch_release/models/`` (names below are the official ones):

- ``official_sample_box_like_coco`` / ``official_initial_descriptor``: ``InstanceEncoder.
  sample_box_like_coco`` and ``InstanceEncoder.get_initial_descriptor`` (``utils.py``), with the
  scale indicator (ADD_SCALE_INDICATOR) and its (H, W) left over from the loop's last instance.
- ``official_mask_out_padding``, ``official_position_embedding_sine``: ``mask_out_padding`` and
  ``PositionEmbeddingSine(128, normalize=True)`` (``utils.py``).
- ``official_decoder_layer``: ``OfficialDecoderLayer.forward`` (``utils.py``) around
  ``my_multi_head_attention_forward`` (``layers/transformer.py``), its key-is-not-value branch
  (q, k, v from slices of ``in_proj_weight``; logits returned before the softmax, −inf at padding).
- ``official_teacher_losses``: ``ModelTeacher_II.forward`` (``teacher.py``) from ``mask_out_padding``
  on, and ``InstanceEncoder.loss`` (``prop_conf``: BCE real vs fake over all queries; ``prop_reg``:
  L1 of the sigmoid edge distances / (w, h, w, h) over real queries).
- ``official_distiller_loss``: ``InstanceConditionalDistillation.forward`` and ``mimic_loss``
  (``distiller.py``, LOSS_FORM 'mse', DISTILL_NORM 'ln', WEIGHT_VALUE 8, TEMP_VALUE 1); the
  student's attention module runs with ``proj_only=True``, so only its value projection (the
  ``in_proj_weight`` slice [2C:]) reaches the loss.
- Defaults from ``utils/build.py`` (``build_distill_configs``).

One call is one GPU's loss (2 images); a batch of 8 must give the mean of 4 such calls (DDP's
average). The official code runs in float64 here; the project's ICD runs in float32 (its query
descriptors and position embeddings are built in float32), so values and gradients are compared
at 1e-5 relative to each tensor's largest entry (and 1e-5 relative element-wise above that);
measured: ≤ 1.3e-7 relative on the terms, ≤ 1.4e-6 of the largest entry on the gradients. The
decoder's query projection is scaled up (logits of std ~2 instead of 0.06) so that the attention,
and with it M and τ, matter: the mutations scale_bins="log2", scale_image="own",
key_region="canonical", τ = 1.01 and a jitter of 0.29 each move a term by 1e-5 to 1e-3.

Randomness: fake classes, sizes, centres and the centre jitter are random. The test replays the
project's draws (its generator order: per image multinomial classes, randn sizes, rand centres,
rand jitter, all queries) and injects the same numbers where the official code calls
``np.random.choice``, ``np.random.normal`` (= mean + std·z), ``np.random.rand`` and
``torch.rand_like``; the official draws for the n slots that GT boxes overwrite are unused. So
everything downstream of the draws is compared exactly: boxes, jittered centres, descriptors,
attention logits, aux losses, distillation loss, gradients. The project's fake sampling runs
through its own ``forward`` (global RNG seeded), not through an injected query set.

Padding: the cache holds teacher features only on each image's 32-padded region. The official
key region (``mask_out_padding``: ceil(h / s) with s = (H_pad/H_l + W_pad/W_l)/2 on the pair's
padded batch) is reproduced exactly; on P6/P7 it can reach beyond the cached region, and those
keys are left out (``train/methods/icd.py``). The one line marked DEVIATION below removes them
from the official key padding mask (the position embedding still normalises by the official
region, as the official code and the project do). In the unpadded cases that line is a no-op,
and the padded cases are chosen so that it is not (asserted). The official teacher's features
on batch padding cannot come from a cache: here they are the cached zeros; they never reach a
loss (masked keys, M = 0).

Padded query slots (beyond an image's queries, up to the longest image of the batch) hold
descriptor one-hot(0) ⊕ sine(0) in the official code and zeros in the project; they never
reach a loss (not real, not in ``positive_mask``), so descriptors and logits are compared on
the images' own queries only.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detectors.detector import DetectorOutput
from train.methods import ICD, DatasetStats
from train.methods.icd import pair_last_sizes, query_descriptors
from train.teacher_batch import TeacherBatch

STRIDES = (8, 16, 32, 64, 128)
C, HEADS, K = 32, 8, 5  # teacher = student FPN width (official: 256 both), 8 heads of 4, 5 classes
SIZE_DIVISIBILITY = 32

# utils/build.py, build_distill_configs
OFFICIAL = dict(NUM_NEG_POS_RATIO=5.0, MAX_LABELS=300, SAMPLE_RANGE=0.3, WEIGHT_VALUE=8.0, TEMP_VALUE=1.0,
                CONFIDENCE_LOSS_WEIGHT=1.0, BYPASS_DISTILL=1000, ATT_HEADS=8)

UNPADDED = [(256, 320)] * 8
# Pairs of different sizes, none a multiple of 32; pairs 0 and 2 have official P6/P7 keys beyond
# the cached region (see the module docstring); image 3 has no GT.
PADDED = [(223, 220), (281, 330), (300, 260), (230, 390), (390, 210), (250, 330), (330, 300), (270, 370)]


def make_targets(image_sizes, seed):
    """Per image 0–4 GT boxes (pixels, xyxy), sides 5–80 % of the image's (scale bins 0–3); image 3
    has none. Image 1's first box is 64.3 px wide: bin 0 under the official 1.44·ln rule, bin 1
    under log2 (image 1 is the last of its pair, so its own size is the pair-last size)."""
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for index, (h, w) in enumerate(image_sizes):
        n = 0 if index == 3 else 1 + index % 4
        bw = (0.05 + 0.75 * torch.rand(n, generator=generator)) * w
        bh = (0.05 + 0.75 * torch.rand(n, generator=generator)) * h
        x1 = torch.rand(n, generator=generator) * (w - bw)
        y1 = torch.rand(n, generator=generator) * (h - bh)
        boxes = torch.stack([x1, y1, x1 + bw, y1 + bh], dim=1)
        if index == 1:
            boxes[0] = torch.tensor([20.0, 10.0, 84.3, 50.0])
        labels = torch.randint(0, K, (n,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
    return targets


def make_stats():
    generator = torch.Generator().manual_seed(7)
    return DatasetStats(class_freq=torch.tensor([0.4, 0.25, 0.1, 0.2, 0.05]),
                        size_mean=0.05 + 0.3 * torch.rand(K, 2, generator=generator),
                        size_std=0.02 + 0.15 * torch.rand(K, 2, generator=generator))


# ---------------------------------------------------------------------------------------------- sizes
def padded(hw):
    return tuple(-(-v // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY for v in hw)


def fpn_map_sizes(padded_hw):
    """detectron2 RetinaNet FPN on a (H, W) padded tensor: P3–P5 = H/stride; P6, P7 = 3×3 stride-2
    convs with padding 1 (LastLevelP6P7): floor((n + 2 − 3) / 2) + 1."""
    h, w = padded_hw
    sizes = [(h // s, w // s) for s in STRIDES[:3]]
    for _ in range(2):
        sizes.append(((sizes[-1][0] - 1) // 2 + 1, (sizes[-1][1] - 1) // 2 + 1))
    return sizes


# ---------------------------------------------------------------------------------------------- draws
def replay_project_draws(targets, seed):
    """The numbers the project's sample_queries draws from torch's global generator after
    ``torch.manual_seed(seed)``, per image: classes (F,), size normals (F, 2), centre uniforms (F, 2),
    jitter uniforms (Q, 2); F = Q − n fake queries."""
    generator = torch.Generator().manual_seed(seed)
    stats = make_stats()
    draws = []
    for target in targets:
        n = target["boxes"].shape[0]
        num_fake = official_num_boxes(n) - n
        classes = torch.multinomial(stats.class_freq.double(), num_fake, replacement=True, generator=generator) \
            if num_fake else torch.zeros(0, dtype=torch.long)
        normals = torch.randn(num_fake, 2, generator=generator)
        centres = torch.rand(num_fake, 2, generator=generator)
        jitter = torch.rand(n + num_fake, 2, generator=generator)
        draws.append((classes, normals, centres, jitter))
    return draws


# ---------------------------------------------------------------------------------------------- official
def official_num_boxes(nr_boxes_cur_img):
    """get_initial_descriptor, SAMPLE_RULE 'relative'."""
    return min(max(1, int(nr_boxes_cur_img * (OFFICIAL["NUM_NEG_POS_RATIO"] + 1))),
               max(OFFICIAL["MAX_LABELS"], nr_boxes_cur_img))


def official_sample_box_like_coco(length, num_real, class_prior, pos_prior, draws):
    """InstanceEncoder.sample_box_like_coco with the draws injected for the fake slots
    [num_real:]; the slots GT boxes overwrite get class 0, z = 0, u = 0.5 (never used)."""
    classes, normals, centres, _ = draws
    samples_class = np.zeros(length, dtype=np.int64)
    samples_class[num_real:] = classes.numpy()  # np.random.choice(num_cls, len, p=class_prior)
    assert class_prior.shape[0] == K
    samples_pos_prob = pos_prior[samples_class]  # K, 2, 4
    loc = samples_pos_prob[:, 0, :]
    std = samples_pos_prob[:, 1, :]
    z = np.zeros((length, 4))
    z[num_real:, 2:] = normals.double().numpy()  # np.random.normal(loc, std) = loc + std·z
    samples_loc = (loc + std * z).reshape(-1, 4).clip(min=loc - 2 * std, max=loc + 2 * std)
    u = np.full((length, 2), 0.5)
    u[num_real:] = centres.double().numpy()  # np.random.rand(K, 2)
    samples_loc[:, :2] = u.clip(min=0.03, max=0.97)
    samples_loc[:, 2:] = samples_loc[:, 2:].clip(min=2e-3, max=0.7)
    final_loc = np.stack((samples_loc[:, 0] - samples_loc[:, 2] / 2, samples_loc[:, 1] - samples_loc[:, 3] / 2,
                          samples_loc[:, 0] + samples_loc[:, 2] / 2, samples_loc[:, 1] + samples_loc[:, 3] / 2)).T
    return samples_class, final_loc


def official_get_pos_embeddings(x, num_pos_feats=128, temperature=10000, scale=2 * math.pi):
    """InstanceEncoder.get_pos_embeddings: (N, seq, 2) -> (N, seq, 2·128) (here in float64)."""
    dim_t = torch.arange(num_pos_feats, dtype=torch.float64)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x[:, :, :, None] * scale / dim_t
    return torch.cat((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=3).flatten(2)


def official_initial_descriptor(instances, draws, class_prior, pos_prior):
    """InstanceEncoder.get_initial_descriptor. instances: ((H, W), gt_boxes (n, 4) px, gt_classes (n,)).

    Returns descriptors (Q, N, D) float64, masks (N, Q) bool (True = no query), gts (N, Q) (1 = real),
    hw_gt (N, Q, 4) and, for the comparison, labels, boxes (N, Q, 4) relative xyxy, centres (N, Q, 2).
    """
    box_descriptor, class_descriptor, batch_gts = [], [], []
    for (H, W), gt_boxes, gt_classes, image_draws in zip(*zip(*instances), draws):
        nr_boxes_cur_img = gt_boxes.shape[0]
        nr_effective_boxes = official_num_boxes(nr_boxes_cur_img)
        sampled_cls, sampled_box = official_sample_box_like_coco(nr_effective_boxes, nr_boxes_cur_img,
                                                                 class_prior, pos_prior, image_draws)
        bboxes = torch.tensor(sampled_box).clamp(min=0, max=1) * torch.tensor([W, H, W, H])
        bboxes[:nr_boxes_cur_img, :] = gt_boxes.reshape(nr_boxes_cur_img, 4)
        labels = torch.tensor(sampled_cls, dtype=torch.long)
        labels[:nr_boxes_cur_img] = gt_classes
        bboxes[:, [0, 2]] /= W
        bboxes[:, [1, 3]] /= H
        chw_bboxes = torch.zeros_like(bboxes)
        chw_bboxes = torch.cat((chw_bboxes, chw_bboxes[:, :2]), 1)
        chw_bboxes[:, 0] = (bboxes[:, 0] + bboxes[:, 2]) / 2
        chw_bboxes[:, 1] = (bboxes[:, 1] + bboxes[:, 3]) / 2
        chw_bboxes[:, 2] = (bboxes[:, 2] - bboxes[:, 0])
        chw_bboxes[:, 3] = (bboxes[:, 3] - bboxes[:, 1])
        jitter = (image_draws[3].double() - 0.5) * OFFICIAL["SAMPLE_RANGE"] * 2.0  # torch.rand_like
        chw_bboxes[:, 4:] = chw_bboxes[:, :2] + jitter * chw_bboxes[:, 2:4]
        chw_bboxes[:, :4] = bboxes
        batch_gts.append(nr_boxes_cur_img)
        box_descriptor.append(chw_bboxes)
        class_descriptor.append(labels)

    n_img, max_seq_length = len(instances), max(b.size(0) for b in box_descriptor)
    final_gts = torch.zeros([n_img, max_seq_length], dtype=torch.float64)
    final_masks = torch.ones([n_img, max_seq_length], dtype=torch.bool)
    final_cls_descriptors = torch.zeros([n_img, max_seq_length], dtype=torch.long)
    # float32 in the official code (torch.zeros' default dtype): the float64 geometry is cast here.
    final_pos_descriptors = torch.zeros([n_img, max_seq_length, 2])
    final_hw_gt = torch.zeros([n_img, max_seq_length, 4])
    boxes = torch.zeros([n_img, max_seq_length, 4], dtype=torch.float64)  # for the comparison only
    for i, (d_cls, d_box, n_gts) in enumerate(zip(class_descriptor, box_descriptor, batch_gts)):
        final_gts[i, :n_gts] = 1.0
        final_masks[i, :d_cls.size(0)] = False
        final_cls_descriptors[i, :d_cls.size(0)] = d_cls
        final_pos_descriptors[i, :d_cls.size(0), :] = d_box[:, 4:]
        final_hw_gt[i, :d_cls.size(0), :2] = d_box[:, 4:] - d_box[:, :2]
        final_hw_gt[i, :d_cls.size(0), 2:4] = d_box[:, 2:4] - d_box[:, 4:]
        boxes[i, :d_cls.size(0)] = d_box[:, :4]
    labels = final_cls_descriptors.clone()
    centres = final_pos_descriptors.clone()

    final_cls_descriptors = F.one_hot(final_cls_descriptors, K)
    final_pos_descriptors = official_get_pos_embeddings(final_pos_descriptors.double())
    final_scale_descriptors = torch.zeros([n_img, max_seq_length, 10], dtype=torch.float64)
    for i, d_box in enumerate(box_descriptor):
        hw = d_box[:, 2:4] - d_box[:, :2]
        hw[:, 0] = hw[:, 0] * W  # H, W: the loop's last instance (official quirk, "pair_last")
        hw[:, 1] = hw[:, 1] * H
        indicator = ((hw.log() * 1.44) - 5.0).clamp(min=0.0, max=4.0).long()
        final_scale_descriptors[i, :d_box.size(0), :] = F.one_hot(indicator, 5).double().reshape(-1, 10)
    final_pos_descriptors = torch.cat((final_pos_descriptors, final_scale_descriptors), 2)
    final_descriptors = torch.cat((final_cls_descriptors, final_pos_descriptors), 2).permute(1, 0, 2)
    return dict(descriptors=final_descriptors, masks=final_masks, gts=final_gts, hw_gt=final_hw_gt.double(),
                labels=labels, boxes=boxes, centres=centres)


def official_mask_out_padding(feat_shapes, image_sizes, tensor_hw):
    """mask_out_padding: True = padding; per level (N, 1, H, W)."""
    h_, w_ = tensor_hw
    masks = []
    for N, H, W in feat_shapes:
        masks_per_feature_level = torch.ones((N, H, W), dtype=torch.bool)
        stride = (h_ / H + w_ / W) / 2
        for img_idx, (h, w) in enumerate(image_sizes):
            masks_per_feature_level[img_idx, :int(np.ceil(float(h) / stride)), :int(np.ceil(float(w) / stride))] = 0
        masks.append(masks_per_feature_level.unsqueeze(1))
    return masks


def official_position_embedding_sine(mask, num_pos_feats=C // 2, temperature=10000, scale=2 * math.pi):
    """PositionEmbeddingSine(hidden_dim // 2, normalize=True).forward (here in float64)."""
    not_mask = ~mask.squeeze(1)
    y_embed = not_mask.cumsum(1, dtype=torch.float64)
    x_embed = not_mask.cumsum(2, dtype=torch.float64)
    eps = 1e-6
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float64)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def official_concate_multiscale_reps(feat, pos_emb, mask):
    """ModelTeacher_II.concate_multiscale_reps: feat, pos (S, N, C); mask (N, S)."""
    feat = torch.cat([f.flatten(2).permute(2, 0, 1) for f in feat], 0)
    pos_emb = torch.cat([p.flatten(2).permute(2, 0, 1) for p in pos_emb], 0)
    mask = torch.cat([m.flatten(2).squeeze(1) for m in mask], 1)
    return feat, pos_emb, mask


def linear(x, weight, bias):
    return x @ weight.T + bias


def official_mlp(layers, x):
    """utils.MLP: ReLU after every layer but the last."""
    for i, (weight, bias) in enumerate(layers):
        x = F.relu(linear(x, weight, bias)) if i < len(layers) - 1 else linear(x, weight, bias)
    return x


def official_decoder_layer(P, q, k, v, key_padding_mask, pos_embedding):
    """OfficialDecoderLayer.forward with my_multi_head_attention_forward (key is not value:
    k = feat + pos_projector(pos), v = feat), dropout 0. q (L, N, C), k, v (S, N, C).
    Returns the decoded queries, the logits before softmax (N, heads, L, S), raw_v (S, N, heads, d)."""
    k = k + linear(pos_embedding, *P["pos_projector"])  # with_pos_embed
    tgt_len, bsz, embed_dim = q.size()
    head_dim = embed_dim // HEADS
    scaling = float(head_dim) ** -0.5
    W, b = P["in_proj_weight"], P["in_proj_bias"]
    q_p = linear(q, W[:embed_dim], b[:embed_dim])
    k_p = linear(k, W[embed_dim:2 * embed_dim], b[embed_dim:2 * embed_dim])
    v_p = linear(v, W[2 * embed_dim:], b[2 * embed_dim:])
    q_p = q_p * scaling
    raw_v = v_p.view(-1, bsz, HEADS, head_dim)
    q_p = q_p.contiguous().view(tgt_len, bsz * HEADS, head_dim).transpose(0, 1)
    k_p = k_p.contiguous().view(-1, bsz * HEADS, head_dim).transpose(0, 1)
    v_p = v_p.contiguous().view(-1, bsz * HEADS, head_dim).transpose(0, 1)
    src_len = k_p.size(1)
    weights = torch.bmm(q_p, k_p.transpose(1, 2))
    weights = weights.view(bsz, HEADS, tgt_len, src_len).masked_fill(
        key_padding_mask.unsqueeze(1).unsqueeze(2), float("-inf")).view(bsz * HEADS, tgt_len, src_len)
    weights_no_softmax = weights
    attn_output = torch.bmm(F.softmax(weights, dim=-1), v_p)
    attn_output = attn_output.transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
    q_ = linear(attn_output, *P["out_proj"])
    q = F.layer_norm(q + q_, (embed_dim,), *P["norm1"])
    q_ = linear(F.relu(linear(q, *P["linear_in"])), *P["linear_out"])
    q = F.layer_norm(q + q_, (embed_dim,), *P["norm2"])
    return q, weights_no_softmax.view(bsz, HEADS, tgt_len, src_len), raw_v


def official_teacher_losses(P, tea_fpn, image_sizes, tensor_hw, desc, cached_valid):
    """ModelTeacher_II.forward from mask_out_padding on (one GPU: 2 images) and InstanceEncoder.loss."""
    mask_out = official_mask_out_padding([tuple(f.shape[:1] + f.shape[2:]) for f in tea_fpn], image_sizes,
                                         tensor_hw)
    pos_embs = [official_position_embedding_sine(m) for m in mask_out]
    key_mask = [m | ~v for m, v in zip(mask_out, cached_valid)]  # DEVIATION: no keys beyond the cache
    feat_k, pos_embs, mask_padding = official_concate_multiscale_reps(tea_fpn, pos_embs, key_mask)
    ins_feat = official_mlp(P["encoder"], desc["descriptors"])  # InstanceEncoder.forward
    ins_mask, ins_mask_gt = desc["masks"], desc["gts"]
    decoded, att_mask, value = official_decoder_layer(P, ins_feat, feat_k, feat_k, mask_padding, pos_embs)

    # InstanceEncoder.loss
    f_pre = official_mlp(P["predictor"], decoded)
    confidence = f_pre[:, :, 0]
    pred_pos = f_pre[:, :, 1:].sigmoid().permute(1, 0, 2)
    pos_gt = desc["hw_gt"]
    pos_gt_scale = pos_gt + pos_gt[:, :, [2, 3, 0, 1]]
    positive_mask = (~ins_mask).double()
    loss_conf = OFFICIAL["CONFIDENCE_LOSS_WEIGHT"] * (F.binary_cross_entropy_with_logits(
        confidence.T, ins_mask_gt, reduction="none") * positive_mask).sum() / positive_mask.sum().clamp(min=1e-6)
    loss_reg = ((F.l1_loss(pred_pos, pos_gt, reduction="none") / pos_gt_scale.clamp(min=1e-7)).sum(-1) *
                ins_mask_gt).sum() / ins_mask_gt.sum().clamp(min=1e-6)
    return {"prop_conf": loss_conf, "prop_reg": loss_reg, "decoded_mask": att_mask, "decoded_value": value,
            "mask_out": mask_out, "mask_padding": mask_padding}


def official_distiller_loss(P, stu_fpn, ins_mask_gt, tmask, tvalue, distill_flag):
    """InstanceConditionalDistillation.forward and mimic_loss ('mse'), one decoder layer."""
    if distill_flag == 0:
        stu_fpn = [f.detach() for f in stu_fpn]
    feat = torch.cat([f.flatten(2).permute(2, 0, 1) for f in stu_fpn], 0)  # S, N, C
    # attention_module(..., proj_only=True): returns raw_v, the value projection of the student features.
    W, b = P["stu_in_proj_weight"], P["stu_in_proj_bias"]
    svalue = linear(feat, W[2 * C:], b[2 * C:]).view(feat.shape[0], feat.shape[1], HEADS, C // HEADS)
    head_dim = C // HEADS
    tmask = tmask.detach()
    tvalue = F.layer_norm(tvalue, (head_dim,)).detach()  # distill_norm_tea, non-affine
    with torch.no_grad():
        value_mask = ((tmask / OFFICIAL["TEMP_VALUE"]).softmax(-1) *
                      ins_mask_gt.unsqueeze(1).unsqueeze(-1)).sum(2, keepdim=True)
    svalue = F.layer_norm(svalue, (head_dim,))  # distill_norm_
    loss = ((F.mse_loss(svalue, tvalue, reduction="none").permute(1, 2, 3, 0) * value_mask).sum(-1) /
            value_mask.sum(-1).clamp(min=1e-6)).mean() * OFFICIAL["WEIGHT_VALUE"]
    return loss / 1  # / len(decoded_feat_list), one layer


def official_parameters(method):
    """The project's weights in the official layout, float64 leaves."""
    def leaf(*tensors):
        return torch.cat([t.detach().double() for t in tensors]).requires_grad_(True)

    d = method.decoder
    return {
        "encoder": [(leaf(l.weight), leaf(l.bias)) for l in method.query_encoder.layers],
        "in_proj_weight": leaf(d.q_proj.weight, d.k_proj.weight, d.v_proj.weight),
        "in_proj_bias": leaf(d.q_proj.bias, d.k_proj.bias, d.v_proj.bias),
        "out_proj": (leaf(d.out_proj.weight), leaf(d.out_proj.bias)),
        "pos_projector": (leaf(d.pos_proj.weight), leaf(d.pos_proj.bias)),
        "norm1": (leaf(d.norm1.weight), leaf(d.norm1.bias)),
        "linear_in": (leaf(d.ffn[0].weight), leaf(d.ffn[0].bias)),
        "linear_out": (leaf(d.ffn[2].weight), leaf(d.ffn[2].bias)),
        "norm2": (leaf(d.norm2.weight), leaf(d.norm2.bias)),
        "predictor": [(leaf(l.weight), leaf(l.bias)) for l in method.aux_head.layers],
        # The distiller's own MultiheadAttention: only the value slice is used (proj_only).
        "stu_in_proj_weight": leaf(torch.zeros(2 * C, C), method.student_value.weight),
        "stu_in_proj_bias": leaf(torch.zeros(2 * C), method.student_value.bias),
    }


def paired_gradients(method, P):
    """(project parameter, its official gradient) for every ICD parameter."""
    d = method.decoder
    g = {k: (v.grad if torch.is_tensor(v) else None) for k, v in P.items()}
    pairs = [(d.q_proj.weight, g["in_proj_weight"][:C]), (d.k_proj.weight, g["in_proj_weight"][C:2 * C]),
             (d.v_proj.weight, g["in_proj_weight"][2 * C:]), (d.q_proj.bias, g["in_proj_bias"][:C]),
             (d.k_proj.bias, g["in_proj_bias"][C:2 * C]), (d.v_proj.bias, g["in_proj_bias"][2 * C:]),
             (method.student_value.weight, g["stu_in_proj_weight"][2 * C:]),
             (method.student_value.bias, g["stu_in_proj_bias"][2 * C:])]
    for module, name in ((d.out_proj, "out_proj"), (d.pos_proj, "pos_projector"), (d.norm1, "norm1"),
                         (d.ffn[0], "linear_in"), (d.ffn[2], "linear_out"), (d.norm2, "norm2")):
        pairs += [(module.weight, P[name][0].grad), (module.bias, P[name][1].grad)]
    for layers, name in ((method.query_encoder.layers, "encoder"), (method.aux_head.layers, "predictor")):
        for layer, (weight, bias) in zip(layers, P[name]):
            pairs += [(layer.weight, weight.grad), (layer.bias, bias.grad)]
    assert len(pairs) == len(list(method.parameters()))
    return pairs


def assert_close_rel(ours, theirs, rel=1e-5):
    """Within ``rel`` of the reference's largest entry, and ``rel`` relative element-wise above that."""
    theirs = torch.zeros_like(ours, dtype=torch.float64) if theirs is None else theirs.detach()
    ours = torch.zeros_like(theirs) if ours is None else ours.detach().double()
    scale = float(theirs.abs().max()) if theirs.numel() else 0.0
    torch.testing.assert_close(ours, theirs, rtol=rel, atol=rel * scale + 1e-30)


# ---------------------------------------------------------------------------------------------- setup
def build_batch(image_sizes, seed):
    """Project inputs: student features (float32 leaves) on the batch maps; the cached teacher
    features on each image's 32-padded region (zero elsewhere), as ``collate_teacher`` lays them out."""
    generator = torch.Generator().manual_seed(seed)
    n = len(image_sizes)
    batch_maps = fpn_map_sizes(tuple(max(padded(s)[i] for s in image_sizes) for i in range(2)))
    cached_sizes = [fpn_map_sizes(padded(s)) for s in image_sizes]
    valid, teacher_fpn = [], []
    for level, (map_h, map_w) in enumerate(batch_maps):
        mask = torch.zeros(n, 1, map_h, map_w, dtype=torch.bool)
        for i, sizes in enumerate(cached_sizes):
            mask[i, :, :sizes[level][0], :sizes[level][1]] = True
        valid.append(mask)
        teacher_fpn.append(torch.randn(n, C, map_h, map_w, generator=generator) * mask)
    student_fpn = [torch.randn(n, C, h, w, generator=generator).requires_grad_(True) for h, w in batch_maps]
    anchors = [torch.zeros(h * w, 4) for h, w in batch_maps]
    student = DetectorOutput(student_fpn, [], [], anchors, STRIDES, list(image_sizes))
    teacher = TeacherBatch(fpn=teacher_fpn, cls=None, box=None, valid=valid, region=None, valid_sizes=cached_sizes)
    return student, teacher


def make_method():
    torch.manual_seed(0)
    config = ICD.Config.for_family("retina")
    assert (config.scale_bins, config.scale_image, config.key_region) == ("official", "pair_last", "official")
    method = ICD(config, num_classes=K, student_channels=C, teacher_channels=C, stats=make_stats())
    with torch.no_grad():  # logits of std ~2 instead of the initial 0.06: a peaked attention, so that
        method.decoder.q_proj.weight.mul_(30)  # M and τ matter (a uniform M would hide them)
    return method


def official_pair_descriptors(g, image_sizes, targets, draws, stats):
    """One GPU's 2 images: get_initial_descriptor with the injected draws; the prior arrays hold
    the project's statistics (mean and std of (w, h) in columns 2 and 3, as coco_obj.json)."""
    pair = slice(2 * g, 2 * g + 2)
    pos_prior = np.zeros((K, 2, 4))
    pos_prior[:, 0, 2:], pos_prior[:, 1, 2:] = stats.size_mean.double().numpy(), stats.size_std.double().numpy()
    class_prior = stats.class_freq.double().numpy()
    instances = [(tuple(size), t["boxes"], t["labels"]) for size, t in zip(image_sizes[pair], targets[pair])]
    return official_initial_descriptor(instances, draws[pair], class_prior, pos_prior)


def official_pair_features(g, image_sizes, teacher):
    """One GPU's 2 images: the padded tensor size (ImageList.from_tensors, size_divisibility 32),
    its level maps, the teacher features cropped to them and the cached region on them."""
    pair = slice(2 * g, 2 * g + 2)
    tensor_hw = tuple(max(padded(s)[i] for s in image_sizes[pair]) for i in range(2))
    maps = fpn_map_sizes(tensor_hw)
    tea = [f[pair][..., :h, :w].double() for f, (h, w) in zip(teacher.fpn, maps)]
    cached = [v[pair][..., :h, :w] for v, (h, w) in zip(teacher.valid, maps)]
    return tensor_hw, maps, tea, cached


# ---------------------------------------------------------------------------------------------- tests
def test_config_defaults_are_the_official_ones():
    config = ICD.Config.for_family("retina")
    assert config.fake_ratio + 1 == OFFICIAL["NUM_NEG_POS_RATIO"] + 1
    assert (config.max_queries, config.center_jitter) == (OFFICIAL["MAX_LABELS"], OFFICIAL["SAMPLE_RANGE"])
    assert (config.distill_weight, config.temperature) == (OFFICIAL["WEIGHT_VALUE"], OFFICIAL["TEMP_VALUE"])
    assert (config.aux_cls_weight, config.aux_box_weight) == (OFFICIAL["CONFIDENCE_LOSS_WEIGHT"], 1.0)
    assert (config.detach_student_iters, config.num_heads) == (OFFICIAL["BYPASS_DISTILL"], OFFICIAL["ATT_HEADS"])


@pytest.mark.parametrize("padding", [False, True])
def test_query_construction_matches_the_official_code(padding):
    """Boxes, jittered centres, real/fake/padding flags, edge targets and descriptors of the
    project's sampled queries equal the official construction from the same draws."""
    image_sizes = PADDED if padding else UNPADDED
    targets, stats, method = make_targets(image_sizes, 1), make_stats(), make_method()
    seed = 11
    torch.manual_seed(seed)
    queries = method.make_queries(targets, image_sizes)
    draws = replay_project_draws(targets, seed)
    ours = query_descriptors(queries, K, "official", pair_last_sizes(image_sizes))  # as decode_instances
    log2_bins = query_descriptors(queries, K, "log2", pair_last_sizes(image_sizes))[..., -10:]
    own_bins = query_descriptors(queries, K, "official")[..., -10:]
    log2_differs = own_differs = 0
    for g in range(len(image_sizes) // 2):
        pair = slice(2 * g, 2 * g + 2)
        desc = official_pair_descriptors(g, image_sizes, targets, draws, stats)
        q = desc["masks"].shape[1]
        is_query = ~desc["masks"]
        assert torch.equal(queries.is_query[pair, :q], is_query) and not queries.is_query[pair, q:].any()
        assert torch.equal(queries.is_real[pair, :q], desc["gts"].bool())
        assert torch.equal(queries.labels[pair, :q][is_query], desc["labels"][is_query])
        torch.testing.assert_close(queries.boxes[pair, :q][is_query].double(), desc["boxes"][is_query],
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(queries.centers[pair, :q][is_query], desc["centres"][is_query], rtol=0, atol=1e-6)
        edges = torch.cat([queries.centers - queries.boxes[..., :2], queries.boxes[..., 2:] - queries.centers], 2)
        torch.testing.assert_close(edges[pair, :q][is_query].double(), desc["hw_gt"][is_query], rtol=0, atol=1e-6)
        theirs = desc["descriptors"].permute(1, 0, 2)  # (N, Q, D)
        torch.testing.assert_close(ours[pair, :q][is_query].double(), theirs[is_query], rtol=0, atol=1e-5)
        # Scale bins compared exactly; how many would change under log2 with each image's own size:
        assert torch.equal(ours[pair, :q, -10:][is_query], theirs[is_query][:, -10:].float())
        official_bins = ours[pair, :q, -10:][is_query]
        log2_differs += int((log2_bins[pair, :q][is_query] != official_bins).any(1).sum())
        own_differs += int((own_bins[pair, :q][is_query] != official_bins).any(1).sum())
    # The official quirks are exercised: the 1.44·ln bin edges (the 64.3 px GT) and, where the images
    # of a pair differ in size, the pair-last image size.
    assert log2_differs >= 1 and (own_differs >= 1) == padding


def run_both(image_sizes, iteration, seed=3):
    method = make_method()
    student, teacher = build_batch(image_sizes, seed)
    targets, stats = make_targets(image_sizes, seed), make_stats()
    torch.manual_seed(seed)  # the project's fake queries, drawn inside forward
    terms = method(student, teacher, targets, iteration)
    ours_total = terms["icd_distill"] + terms["icd_aux_cls"] + terms["icd_aux_box"]
    ours_total.backward()

    draws = replay_project_draws(targets, seed)
    P = official_parameters(method)
    student_leaves = [f.detach().double().requires_grad_(True) for f in student.features]
    per_gpu, beyond_cache = [], 0
    for g in range(len(image_sizes) // 2):
        desc = official_pair_descriptors(g, image_sizes, targets, draws, stats)
        tensor_hw, maps, tea, cached = official_pair_features(g, image_sizes, teacher)
        tea_out = official_teacher_losses(P, tea, image_sizes[2 * g:2 * g + 2], tensor_hw, desc, cached)
        beyond_cache += sum(int((~m & ~v).sum()) for m, v in zip(tea_out["mask_out"], cached))
        stu = [f[2 * g:2 * g + 2, :, :h, :w] for f, (h, w) in zip(student_leaves, maps)]
        distill_flag = 0 if iteration < OFFICIAL["BYPASS_DISTILL"] else 1
        distill = official_distiller_loss(P, stu, desc["gts"], tea_out["decoded_mask"], tea_out["decoded_value"],
                                          distill_flag)
        per_gpu.append({"icd_distill": distill, "icd_aux_cls": tea_out["prop_conf"],
                        "icd_aux_box": tea_out["prop_reg"], "logits": tea_out["decoded_mask"], "maps": maps,
                        "desc": desc})
    theirs = {key: sum(p[key] for p in per_gpu) / len(per_gpu)  # DDP: mean over GPUs
              for key in ("icd_distill", "icd_aux_cls", "icd_aux_box")}
    (theirs["icd_distill"] + theirs["icd_aux_cls"] + theirs["icd_aux_box"]).backward()
    return method, student, teacher, targets, terms, theirs, P, student_leaves, per_gpu, beyond_cache


@pytest.mark.parametrize("iteration", [999, 1000])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("num_images", [2, 8])
def test_icd_losses_and_gradients_match_the_official_code(num_images, padding, iteration):
    image_sizes = (PADDED if padding else UNPADDED)[:num_images]
    method, student, teacher, targets, terms, theirs, P, student_leaves, per_gpu, beyond_cache = \
        run_both(image_sizes, iteration)
    # The marked DEVIATION line matters exactly in the padded cases (pair 0 reaches beyond the cache).
    assert (beyond_cache > 0) == padding

    for key in ("icd_distill", "icd_aux_cls", "icd_aux_box"):
        assert terms[key].item() == pytest.approx(theirs[key].item(), rel=1e-5), key

    # Gradients: student features (none before iteration 1000) and every ICD parameter.
    for ours_f, theirs_f in zip(student.features, student_leaves):
        if iteration < OFFICIAL["BYPASS_DISTILL"]:
            assert ours_f.grad is None and theirs_f.grad is None
        else:
            assert_close_rel(ours_f.grad, theirs_f.grad)
    pairs = paired_gradients(method, P)
    largest = max(float(official.abs().max()) for _, official in pairs)
    for parameter, official_grad in pairs:
        if official_grad.abs().max() < 1e-12 * largest:
            # The key bias and the position projection's bias shift every key of a query's logits
            # alike, so the softmax ignores them: gradient 0 (float32 round-off in the project).
            assert parameter.grad.abs().max() <= 1e-5 * largest
        else:
            assert_close_rel(parameter.grad, official_grad)


@pytest.mark.parametrize("padding", [False, True])
def test_attention_logits_match_the_official_code(padding):
    """The teacher decoder's logits A = q·k/√d (−inf at masked keys) over each pair's sequence."""
    image_sizes = PADDED if padding else UNPADDED
    method, student, teacher, targets, terms, theirs, P, _, per_gpu, _ = run_both(image_sizes, 1000)
    torch.manual_seed(3)
    queries = method.make_queries(targets, list(image_sizes))
    with torch.no_grad():
        _, logits, _ = method.decode_instances(teacher, queries)  # (N, heads, Q, S_batch)
    batch_maps = [tuple(f.shape[-2:]) for f in teacher.fpn]
    offsets = np.cumsum([0] + [h * w for h, w in batch_maps])
    for g, official in enumerate(per_gpu):
        # The pair's sequence inside the batch's: level by level, the pair's map at the top left.
        index = torch.cat([(offsets[level] + torch.arange(h)[:, None] * batch_maps[level][1]
                            + torch.arange(w)[None, :]).flatten()
                           for level, (h, w) in enumerate(official["maps"])])
        is_query = ~official["desc"]["masks"]  # (2, Q_pair)
        q = is_query.shape[1]
        ours = logits[2 * g:2 * g + 2, :, :q][:, :, :, index]  # (2, heads, Q_pair, S_pair)
        reference = official["logits"].detach()
        rows = is_query[:, None, :].expand(-1, HEADS, -1)
        ours, reference = ours[rows], reference[rows]  # (queries, S_pair)
        assert torch.equal(torch.isinf(ours), torch.isinf(reference))
        finite = torch.isfinite(reference)
        assert_close_rel(ours[finite], reference[finite])
        # Keys outside the pair's maps (the rest of the batch's) are all masked.
        outside = torch.ones(logits.shape[-1], dtype=torch.bool)
        outside[index] = False
        assert torch.isinf(logits[2 * g:2 * g + 2][..., outside]).all()
