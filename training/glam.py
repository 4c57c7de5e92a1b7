"""GLAM as its paper builds it (Song, Han & Avrithis, "All the attention you need: global-local, spatial-channel
attention for image retrieval", WACV 2022): two streams on the feature tensor F (c,h,w), each a channel attention
followed by a spatial attention computed on the channel-attended tensor, fused with F by learned weights.

σ is the sigmoid, ⊙ the broadcast product, GAP global average pooling, all convolutions are learned.

local channel    A^l_c = σ(conv1d_k(GAP(F)))                                   (c×1×1)
                 F^l_c = F ⊙ A^l_c + F
local spatial    A^l_s = σ(W_s [R; D_1 R; D_3 R; D_5 R]),  R = W_r F^l_c      (1×h×w; on the channel-attended map)
                 (W_r: 1x1 conv to c' = c/r; D_d: 3x3 conv, dilation d; W_s: 1x1 conv to one channel)
                 F^l = F^l_c ⊙ A^l_s + F^l_c
global channel   Q_c = σ(conv1d_q(GAP(F))), K_c = σ(conv1d_k(GAP(F)))           (1×c each)
                 A^g_c = softmax(K_cᵀ Q_c)                                      (c×c, each column sums to 1)
                 G_c = V_c A^g_c,  V_c = F as hw×c;  F^g_c = F ⊙ G_c + F
global spatial   Q_s, K_s, V_s = W_q F^g_c, W_k F^g_c, W_v F^g_c               (c'×hw; on the channel-attended map)
                 A^g_s = softmax(K_sᵀ Q_s)                                      (hw×hw, each column sums to 1)
                 G_s = W_o (V_s A^g_s)                                          (W_o: 1x1 conv back to c channels)
                 F^g = F^g_c ⊙ G_s + F^g_c
fusion           F^gl = w_l F^l + w_g F^g + w F,  (w_l, w_g, w) = softmax of three learned scalars
descriptor       e = L2(W GeM(F^gl) + b)

This is what `glam` builds by default (`glam:form=paper`). The talk in the seeds (file 001) gives the components
(local / global × channel / spatial, hw×hw and c×c interactions) and the fusion with the input; the residual
products above mirror the local stream for the global one, as the paper's figure draws both streams. The older
form of this project (`glam:form=gate`, the default until the paper form replaced it) differs in three places: its
local spatial attention reads F instead of F^l_c, its global spatial attention reads F instead of F^g_c and gates
with σ(G_s) (scaled by 1/√c'), and its global channel step is F + G_c. Options as the gate form's: local / global
(the ablation), reduction, kernel, channels (a 1x1 conv + ReLU to c0 channels first).
"""
from __future__ import annotations

import torch

from asymsearch.training.heads import GLAMHead, _flat


class GLAMPaperHead(GLAMHead):
    """GLAM in the paper's form (see the module doc), then GeM, a projection to `dim` and L2 normalisation. The
    parameters, their names and the fusion are those of the gate form (`GLAMHead`), so only the two streams differ."""

    def local_stream(self, x: torch.Tensor) -> torch.Tensor:
        """F^l: local channel attention, then local spatial attention on the channel-attended map."""
        a_c = torch.sigmoid(self.lc_conv(x.mean(dim=(-2, -1)).unsqueeze(1))).squeeze(1)[:, :, None, None]
        f_c = x * a_c + x
        r = self.ls_reduce(f_c)
        a_s = torch.sigmoid(self.ls_out(torch.cat([r] + [conv(r) for conv in self.ls_dilated], dim=1)))
        return f_c * a_s + f_c

    def global_channel(self, x: torch.Tensor) -> torch.Tensor:
        """F^g_c = F ⊙ G_c + F, G_c[j] = Σ_i A^g_c[i, j] F[i], A^g_c[i, j] = softmax_i(k_i q_j)."""
        z = x.mean(dim=(-2, -1)).unsqueeze(1)  # (n,1,c)
        q, k = torch.sigmoid(self.gc_q(z)).squeeze(1), torch.sigmoid(self.gc_k(z)).squeeze(1)  # (n,c)
        a = torch.softmax(k.unsqueeze(2) * q.unsqueeze(1), dim=1)  # (n,c_i,c_j): K_cᵀ Q_c, columns sum to 1
        g_c = torch.bmm(a.transpose(1, 2), _flat(x)).view_as(x)  # G_c[j] = Σ_i a[i,j] F[i]
        return x * g_c + x

    def global_spatial(self, f_c: torch.Tensor) -> torch.Tensor:
        """G_s on the channel-attended map: W_o (V_s A^g_s), A^g_s[u, v] = softmax_u(k_u · q_v)."""
        n = f_c.shape[0]
        qs, ks, vs = _flat(self.gs_q(f_c)), _flat(self.gs_k(f_c)), _flat(self.gs_v(f_c))  # (n,c',hw)
        a = torch.softmax(torch.bmm(ks.transpose(1, 2), qs), dim=1)  # (n,hw_u,hw_v): K_sᵀ Q_s, columns sum to 1
        return self.gs_out(torch.bmm(vs, a).view(n, -1, *f_c.shape[2:]))

    def global_stream(self, x: torch.Tensor) -> torch.Tensor:
        """F^g: global channel attention, then global spatial attention on the channel-attended map."""
        f_c = self.global_channel(x)
        return f_c * self.global_spatial(f_c) + f_c

    local_attention = local_stream  # what GLAMHead.forward fuses

    global_attention = global_stream
