// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// The Keccak Merkle tree of core/merkle.cpp written plainly (abi.encodePacked, no
/// assembly), to build commitments and proofs in tests and cross-check the market's
/// verifyLeaf: leaf node K(0x00 ‖ leaf), inner K(0x01 ‖ l ‖ r), odd last node carried.
library MerkleTree {
    function leafNode(bytes32 leaf) internal pure returns (bytes32) {
        return keccak256(abi.encodePacked(bytes1(0x00), leaf));
    }

    function inner(bytes32 left, bytes32 right) internal pure returns (bytes32) {
        return keccak256(abi.encodePacked(bytes1(0x01), left, right));
    }

    /// Every level, leaf nodes first, the root's level last.
    function levels(bytes32[] memory leaves) internal pure returns (bytes32[][] memory out) {
        uint256 depth = 1;
        for (uint256 n = leaves.length; n > 1; n = (n + 1) / 2) ++depth;
        out = new bytes32[][](depth);
        bytes32[] memory level = new bytes32[](leaves.length);
        for (uint256 i = 0; i < leaves.length; ++i) level[i] = leafNode(leaves[i]);
        out[0] = level;
        for (uint256 h = 1; h < depth; ++h) {
            bytes32[] memory up = new bytes32[]((level.length + 1) / 2);
            for (uint256 i = 0; i + 1 < level.length; i += 2) up[i / 2] = inner(level[i], level[i + 1]);
            if (level.length % 2 == 1) up[up.length - 1] = level[level.length - 1];
            out[h] = up;
            level = up;
        }
    }

    function root(bytes32[] memory leaves) internal pure returns (bytes32) {
        bytes32[][] memory ls = levels(leaves);
        return ls[ls.length - 1][0];
    }

    function proofFrom(bytes32[][] memory ls, uint256 index) internal pure returns (bytes32[] memory out) {
        bytes32[] memory siblings = new bytes32[](ls.length);
        uint256 k = 0;
        for (uint256 h = 0; h + 1 < ls.length; ++h) {
            uint256 sibling = index % 2 == 1 ? index - 1 : index + 1;
            if (sibling < ls[h].length) siblings[k++] = ls[h][sibling];
            index /= 2;
        }
        out = new bytes32[](k);
        for (uint256 i = 0; i < k; ++i) out[i] = siblings[i];
    }

    function proof(bytes32[] memory leaves, uint256 index) internal pure returns (bytes32[] memory) {
        return proofFrom(levels(leaves), index);
    }
}
