"""FAISS on one thread in these tests: OpenMP threads spinning against a busy machine made
small searches slower, and the results do not depend on the thread count."""

import faiss
import pytest


@pytest.fixture(autouse=True, scope="session")
def _faiss_one_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
