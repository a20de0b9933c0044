"""pyengine's own NcclComm at world size 1, and its error path. Needs a GPU."""
import pytest
import torch
import torch.distributed as dist

from dist_util import free_port

pytestmark = pytest.mark.cuda


@pytest.fixture
def world_of_one():
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_nccl_comm_world_size_one(world_of_one):
    from pyengine.comm.nccl_comm import NcclComm, available

    assert available()
    comm = NcclComm(timeout=30.0, device="cuda:0")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(1 << 20, device="cuda").to(dtype)
        ref = x.clone()
        comm.allreduce(x, average=True).wait()
        comm.allreduce(x, average=False).wait()
        torch.cuda.synchronize()
        assert torch.equal(x, ref)
    out = torch.empty(4096, device="cuda")
    inp = torch.randn(4096, device="cuda")
    comm.reduce_scatter(out, inp, average=False).wait()
    torch.cuda.synchronize()
    assert torch.equal(out, inp)
    gathered = torch.empty(4096, device="cuda")
    comm.all_gather(gathered, inp).wait()
    torch.cuda.synchronize()
    assert torch.equal(gathered, inp)
    with pytest.raises(ValueError, match="world_size x output"):
        comm.reduce_scatter(out[:10], inp, average=False)


def test_nccl_comm_error_path(world_of_one):
    from pyengine.comm.base import CommError
    from pyengine.comm.nccl_comm import NcclComm

    comm = NcclComm(timeout=30.0, device="cuda:0")
    x = torch.ones(1024, device="cuda")
    comm.allreduce(x, average=False).wait()
    comm.abort("simulated failure")
    with pytest.raises(CommError, match="simulated failure"):
        comm.check()
    with pytest.raises(RuntimeError, match="simulated failure"):
        comm.allreduce(x, average=False)
    with pytest.raises(ValueError, match="CUDA device"):
        NcclComm(timeout=30.0, device="cuda:0").allreduce(torch.ones(4), average=False)


def test_nccl_sendrecv_to_itself_at_world_size_one(world_of_one):
    """The grouped ncclSend/ncclRecv of deterministic mode's exchange, unequal counts included,
    and the fixed-pairing collectives over it (no rounds at one rank: the input comes back)."""
    from pyengine.comm.nccl_comm import NcclComm
    from pyengine.ddp.exchange import TreeComm

    comm = NcclComm(timeout=30.0, device="cuda:0")
    p2p = comm.point_to_point(30.0)
    for dtype in (torch.float32, torch.bfloat16):
        send = torch.randn(4097, device="cuda").to(dtype)
        recv = torch.zeros(4097, device="cuda", dtype=dtype)
        p2p.exchange(send, recv, 0)
        torch.cuda.synchronize()
        assert torch.equal(recv, send)
    with pytest.raises(ValueError, match="peer out of range"):
        p2p.exchange(send, recv, 1)
    tree = TreeComm(comm, torch.device("cuda", 0), 30.0)
    x = torch.randn(1000, device="cuda")
    ref = x.clone()
    tree.allreduce(x, average=False).wait()
    out = torch.empty(1000, device="cuda")
    tree.all_gather(out, x).wait()
    torch.cuda.synchronize()
    assert torch.equal(x, ref) and torch.equal(out, ref) and tree.rounds == 0


def test_nccl_abort_raises_the_abort_word_and_later_collectives_fail(world_of_one):
    """abort() sets the mapped abort word (read here through its host address) before the
    communicator goes, and a collective after it raises CommError with the reason, on the
    host, before reaching NCCL."""
    import ctypes

    from pyengine.comm.base import CommError
    from pyengine.comm.nccl_comm import NcclComm

    comm = NcclComm(timeout=30.0, device="cuda:0")
    assert comm.abort_word != 0
    word = ctypes.c_int32.from_address(comm._c.abort_word_host())
    x = torch.ones(1024, device="cuda")
    comm.allreduce(x, average=False).wait()
    torch.cuda.synchronize()
    assert word.value == 0
    comm.abort("simulated peer failure")
    assert word.value == 1 and comm._c.aborted
    for call in (lambda: comm.allreduce(x, average=False),
                 lambda: comm.reduce_scatter(x[:1024], x, average=False),
                 lambda: comm.all_gather(x, x[:1024]),
                 lambda: comm.point_to_point(30.0).exchange(x, x.clone(), 0)):
        with pytest.raises(CommError, match="simulated peer failure"):
            call()
    with pytest.raises(CommError, match="simulated peer failure"):
        comm.check()
